"""The small files written after the shards: config.json (with the quantization_config the
consumers read), the index, and the provenance file mxconv.json, written last of all: its presence
marks a conversion complete."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from converter.files import CONFIG_FILE, INDEX_FILE, PROVENANCE_FILE, STATE_DIR
from converter.plan.planner import ConversionPlan
from converter.run.consumers import consumer_keys, skip_list
from converter.run.output import index_bytes, json_bytes, unlock
from converter.run.writer import write_bytes_atomic
from converter.sources.checkpoint import SourceCheckpoint
from converter.version import __version__


def output_config(source_config: dict, plan: ConversionPlan, moe_layout: dict | None) -> dict:
    config = {k: v for k, v in source_config.items() if k != "quantization_config"}
    if plan.recipe.target == "mxfp8":
        qc = {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [1, 32], "scale_fmt": "ue8m0",
              "modules_to_not_convert": skip_list(plan.modules_to_not_convert)}
        qc.update(consumer_keys(qc["modules_to_not_convert"], plan.recipe.scale_name))
        if moe_layout:
            qc["moe_weight_layout"] = moe_layout
        config["quantization_config"] = qc
    return config


def write_index_and_config(dst: Path, plan: ConversionPlan, config: dict) -> None:
    write_bytes_atomic(dst / INDEX_FILE, index_bytes(plan), tmp_dir=dst / STATE_DIR)
    write_bytes_atomic(dst / CONFIG_FILE, json_bytes(config), tmp_dir=dst / STATE_DIR)


def _shard_records(src: SourceCheckpoint, source_hashes: dict[str, str], hub: set[str]) -> dict[str, dict]:
    """Each source file's size and sha256, and where the sha256 came from: hashed by mxconv, or
    the Hub's own record of a download (`hub`: their names; hub_digests.py)."""
    out = {}
    for p in src.files:
        sha = source_hashes.get(p.name)
        out[p.name] = {"bytes": p.stat().st_size, "sha256": sha}
        if sha is not None:
            out[p.name]["sha256_by"] = "huggingface_hub download record" if p.name in hub else "mxconv"
    return out


def write_provenance(dst: Path, src: SourceCheckpoint, plan: ConversionPlan, *, mapping: str,
                     source_hashes: dict[str, str], options: dict, origin: dict | None = None,
                     hub_recorded: set[str] | None = None) -> dict:
    """Written last of all: its presence marks the conversion complete. `origin`: the `source`
    block of an earlier conversion that `src` came from (unshuffle), which then stays the source,
    `src` being recorded as `derived_from`."""
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
            "shards": _shard_records(src, source_hashes, set(hub_recorded or ())),
        },
        "recipe": plan.recipe.to_dict(),
        "options": options,
        "output": {"shards": len(plan.shards), "total_size": plan.total_size, "tensors": tensors,
                   "modules_to_not_convert": plan.modules_to_not_convert},
    }
    if Path(src.side_root) != Path(src.root):  # a DCP source: its config.json came from --config
        data["source"]["config"] = str(Path(src.side_root).resolve())
    if origin is not None:
        data["derived_from"], data["source"] = data["source"], origin
    write_bytes_atomic(dst / PROVENANCE_FILE, json_bytes(data), tmp_dir=dst / STATE_DIR)
    unlock(dst)
    return data
