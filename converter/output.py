"""The destination directory: its state (fresh, resumable, complete), the manifest that makes a
resume safe, and the small files written after the shards (index, config, provenance)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .checkpoint import PICKLE_SUFFIXES, SourceCheckpoint
from .errors import OutputError
from .files import (CONFIG_FILE, INDEX_FILE, MANIFEST_FILE, PROVENANCE_FILE, SINGLE_FILE, STATE_DIR,
                    VERIFY_REPORT_FILE)
from .plan import ConversionPlan, ShardPlan
from .safetensors_io import build_header, write_bytes_atomic
from .units import format_size

# Source files never copied into the destination: weights and what mxconv writes itself.
_SKIP_NAMES = {CONFIG_FILE, INDEX_FILE, SINGLE_FILE, PROVENANCE_FILE, VERIFY_REPORT_FILE}
_SKIP_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def plan_fingerprint(src: SourceCheckpoint, plan: ConversionPlan, mapping: str) -> dict:
    """Everything the output bytes depend on. Device and worker count are deliberately absent:
    they never change a byte, so a resume may use other ones."""
    sources = {}
    for path in src.files:
        st = path.stat()
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header_hash = hashlib.sha256(f.read(n)).hexdigest()
        sources[path.name] = {"bytes": st.st_size, "header_sha256": header_hash}
    layout = hashlib.sha256(json.dumps(
        [[s.name, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in plan.shards]).encode()).hexdigest()
    return {"mxconv_version": __version__, "recipe": plan.recipe.to_dict(), "mapping": mapping,
            "source_format": plan.source_format.value, "sources": sources, "layout_sha256": layout}


@dataclass
class DestinationState:
    done_shards: set[str]
    complete: bool


def prepare_destination(src_root: Path, dst: Path, fingerprint: dict, plan: ConversionPlan,
                        overwrite: bool) -> DestinationState:
    """Check DST against SRC and any earlier run; returns which shards are already finished."""
    src_root, dst = src_root.resolve(), dst.resolve()
    if dst == src_root or src_root in dst.parents:
        raise OutputError(f"destination must not be the source or inside it ({src_root})", file=dst)
    if dst in src_root.parents:
        raise OutputError("destination must not contain the source", file=dst)
    manifest_path = dst / STATE_DIR / MANIFEST_FILE
    if dst.exists() and not dst.is_dir():
        raise OutputError("destination exists and is not a directory", file=dst)
    if dst.exists() and any(dst.iterdir()):
        if overwrite:
            _clear(dst)
        elif not manifest_path.exists():
            raise OutputError("destination is not empty and was not written by mxconv; "
                              "use --overwrite to replace its contents", file=dst)
        else:
            try:
                previous = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous != fingerprint:
                changed = sorted(k for k in fingerprint if (previous or {}).get(k) != fingerprint[k])
                raise OutputError(f"destination holds an earlier conversion with a different "
                                  f"{', '.join(changed) or 'manifest'}; use --overwrite to start again", file=dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / STATE_DIR).mkdir(exist_ok=True)
    write_bytes_atomic(manifest_path, _json_bytes(fingerprint))
    done = {s.name for s in plan.shards
            if (dst / s.name).exists() and (dst / s.name).stat().st_size == shard_file_size(s)}
    return DestinationState(done, complete=(dst / PROVENANCE_FILE).exists() and len(done) == len(plan.shards))


def shard_file_size(shard: ShardPlan) -> int:
    header, _ = build_header(shard.tensors)
    return len(header) + shard.nbytes


def _clear(dst: Path) -> None:
    for child in dst.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_free_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if free < needed:
        raise OutputError(f"not enough free disk space: the conversion needs {format_size(needed)} more, "
                          f"{format_size(free)} are free", file=dst)


def copy_side_files(src_root: Path, dst: Path) -> list[str]:
    """Tokenizer, generation config, custom code, license, README: everything but weights."""
    copied = []
    for path in sorted(src_root.rglob("*")):
        rel = path.relative_to(src_root)
        if (not path.is_file() or any(p.startswith(".") for p in rel.parts)
                or rel.name in _SKIP_NAMES or rel.suffix in _SKIP_SUFFIXES):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        copied.append(str(rel))
    return copied


def output_config(source_config: dict, plan: ConversionPlan, moe_layout: dict | None) -> dict:
    config = {k: v for k, v in source_config.items() if k != "quantization_config"}
    if plan.recipe.target == "mxfp8":
        qc = {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [1, 32], "scale_fmt": "ue8m0",
              "modules_to_not_convert": plan.modules_to_not_convert}
        if moe_layout:
            qc["moe_weight_layout"] = moe_layout
        config["quantization_config"] = qc
    return config


def write_index_and_config(dst: Path, plan: ConversionPlan, config: dict) -> None:
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
    write_bytes_atomic(dst / INDEX_FILE, _json_bytes(index))
    write_bytes_atomic(dst / CONFIG_FILE, _json_bytes(config))


def write_provenance(dst: Path, src: SourceCheckpoint, plan: ConversionPlan, *, mapping: str,
                     source_hashes: dict[str, str], options: dict) -> dict:
    """Written last of all: its presence marks the conversion complete."""
    tensors = {"mxfp8": plan.counts.get("mxfp8", 0), "bf16": plan.counts.get("dequantized_bf16", 0),
               "copied": plan.counts.get("copied", 0)}
    data = {
        "mxconv_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "source": {
            "path": str(src.root.resolve()),
            "format": plan.source_format.value,
            "mapping": mapping,
            "base_model": src.config.get("_name_or_path") or None,
            "shards": {p.name: {"bytes": p.stat().st_size, "sha256": source_hashes.get(p.name)} for p in src.files},
        },
        "recipe": plan.recipe.to_dict(),
        "options": options,
        "output": {"shards": len(plan.shards), "total_size": plan.total_size, "tensors": tensors,
                   "modules_to_not_convert": plan.modules_to_not_convert},
    }
    write_bytes_atomic(dst / PROVENANCE_FILE, _json_bytes(data))
    return data
