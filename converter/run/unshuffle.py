"""`mxconv unshuffle`: a checkpoint with routed experts pre-shuffled for FlashInfer's TRT-LLM
MoE back to the canonical MXFP8 layout (gate_proj / up_proj / down_proj per expert), tensor
for tensor byte-identical to a canonical conversion of the same source."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from converter.errors import MxconvError, SourceError
from converter.files import CONFIG_FILE, PROVENANCE_FILE
from converter.plan.planner import (
    COPY,
    UNPACK_W2,
    UNPACK_W13,
    ConversionPlan,
    Job,
    Operand,
    mxfp8_outputs,
    natural_key,
    pack_shards,
)
from converter.plan.recipe import recipe_from_dict
from converter.plan.view import CanonicalView
from converter.numerics.trtllm_layout import LAYOUT_METADATA
from converter.run.consumers import per_layer_entries
from converter.run.pipeline import ConversionResult, write_checkpoint
from converter.sources.checkpoint import SourceCheckpoint, SourceFormat, scale_name
from converter.sources.safetensors import PlannedTensor
from converter.units import parse_size

_PACKED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.(w13|w2)_weight(_scale_inv)?$")


def _finished_provenance(path: Path) -> dict:
    """The mxconv.json of a finished conversion, or a SourceError saying why not."""
    try:
        prov = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError("no mxconv.json: the pre-shuffled checkpoint is incomplete or was not written by mxconv",
                          file=path) from None
    except (OSError, ValueError) as e:
        raise SourceError(f"unreadable provenance file: {e}", file=path) from e
    if not isinstance(prov, dict) or prov.get("complete") is not True:
        raise SourceError("the pre-shuffled checkpoint is not marked complete", file=path)
    if not isinstance(prov.get("recipe"), dict) or not isinstance(prov.get("source"), dict) \
            or "format" not in prov["source"]:
        raise SourceError("provenance file lacks its recipe or source", file=path)
    return prov


def plan_unshuffle(ckpt: SourceCheckpoint, max_shard_bytes: int) -> tuple[ConversionPlan, dict]:
    """The plan that undoes the TRT-LLM layout, and the provenance of the original conversion."""
    qc = ckpt.config.get("quantization_config") or {}
    layout = qc.get("moe_weight_layout") or {}
    config_path = ckpt.root / CONFIG_FILE
    if layout.get("format") != LAYOUT_METADATA["format"]:
        raise SourceError("not a pre-shuffled checkpoint: quantization_config has no FlashInfer TRT-LLM "
                          "moe_weight_layout", file=config_path)
    prov = _finished_provenance(ckpt.root / PROVENANCE_FILE)
    recipe = recipe_from_dict(dict(prov["recipe"], moe_layout="canonical",
                                   name=f"{prov['recipe'].get('name', 'recipe')} (unshuffled)"),
                              str(ckpt.root / PROVENANCE_FILE))
    jobs: list[Job] = []
    for name, info in ckpt.tensors.items():
        m = _PACKED_RE.match(name)
        if m and m.group(3):
            continue  # scales travel with their weights
        if not m:
            jobs.append(Job(COPY, (Operand(name),), (PlannedTensor(name, info.dtype, info.shape),), info.nbytes,
                            (str(info.file), info.start, name)))
            continue
        prefix, which = m.group(1), m.group(2)
        scale = scale_name(name)
        if scale not in ckpt.tensors:
            raise SourceError(f"packed expert weight has no {scale}", file=info.file, tensor=name)
        rows, k = info.shape
        if which == "w13":
            outputs = (mxfp8_outputs(f"{prefix}.gate_proj", (rows // 2, k))
                       + mxfp8_outputs(f"{prefix}.up_proj", (rows // 2, k)))
        else:
            outputs = mxfp8_outputs(f"{prefix}.down_proj", (rows, k))
        jobs.append(Job(UNPACK_W13 if which == "w13" else UNPACK_W2, (Operand(name, scale),), outputs,
                        info.nbytes + ckpt.tensors[scale].nbytes, natural_key(outputs[0].name)))
    jobs.sort(key=lambda j: j.sort_key)
    counts = dict(prov.get("output", {}).get("tensors", {}))
    plan = ConversionPlan(SourceFormat(prov["source"]["format"]), recipe, pack_shards(jobs, max_shard_bytes),
                          sorted(per_layer_entries(qc.get("modules_to_not_convert", [])), key=natural_key),
                          {"mxfp8": counts.get("mxfp8", 0), "dequantized_bf16": counts.get("bf16", 0),
                           "copied": counts.get("copied", 0)})
    return plan, prov


def packed_view(src: str) -> CanonicalView:
    """The pre-shuffled checkpoint as its tensors are named: how each node of a Ray cluster
    opens it again."""
    return CanonicalView(SourceCheckpoint.open(src))


def unshuffle(src: str | Path, dst: str | Path, *, device: str = "cpu", workers: int | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False, quiet: bool = False,
              ray: str | None = None) -> ConversionResult:
    """What `mxconv unshuffle SRC DST` does. The result's mxconv.json keeps the original source
    (so `mxconv verify ORIGINAL_SRC DST` checks it) and records SRC as `derived_from`. `ray`:
    as for `convert`."""
    if workers is not None and workers < 1:
        raise MxconvError(f"--workers must be at least 1, got {workers}")
    if ray is not None:
        src, dst = os.path.abspath(src), os.path.abspath(dst)
    ckpt = SourceCheckpoint.open(src)
    ckpt.check_architecture()
    plan, prov = plan_unshuffle(ckpt, parse_size(max_shard_size))
    mapping = prov["source"].get("mapping", "hf")
    config = json.loads(json.dumps(ckpt.config))
    config["quantization_config"].pop("moe_weight_layout")
    result = ConversionResult(Path(dst), ckpt, plan, mapping)
    options = {"operation": "unshuffle", "device": device, "workers": workers,
               "max_shard_size": parse_size(max_shard_size)}
    return write_checkpoint(result, CanonicalView(ckpt), config, device=device, workers=workers,
                            overwrite=overwrite, quiet=quiet, hash_sources=True, options=options,
                            origin=prov["source"], ray=ray, opener=functools.partial(packed_view, str(src)))
