"""`mxconv inspect PATH`: what a checkpoint is, from its config, index and shard headers alone
(no tensor data is read, so it takes a moment even for 671B): architecture, precision and
quantization format, model family (families/*.yaml), MoE layout, tensor counts and sizes, modules
kept in high precision, MTP, who loads it, and, for mxconv outputs, whether the conversion is
complete (an interrupted one is described as such, with how far it got) and verified.
`exit_status` is the command's exit status: 1 when the report lists problems or an unfinished
conversion, so that scripts can tell."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from converter.errors import MxconvError
from converter.files import CONFIG_FILE, PROVENANCE_FILE, STATE_DIR, VERIFY_REPORT_FILE
from converter.models.family import family_or_none
from converter.numerics.reference import MX_BLOCK
from converter.plan.planner import natural_key
from converter.run.consumers import per_layer_entries, who_loads
from converter.run.output import incomplete_reason
from converter.sources.checkpoint import scale_name
from converter.units import format_size
from converter.verify.checks import HIGH_PRECISION_DTYPES, Failure, read_destination, read_json

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_SHOWN_MODULES = 6
_NO_CONFIG = f"unknown (no readable {CONFIG_FILE})"


def _precision(tensors: dict, qc: dict | None) -> str:
    """What the weights are: mxfp8, fp8, fp8_ue8m0, or the dtype of the linear weights."""
    fp8 = [n for n, i in tensors.items() if i.dtype == "F8_E4M3"]
    if fp8:
        scales = [tensors.get(scale_name(n), tensors.get(n + "_scale")) for n in fp8]  # or vLLM's weight_scale
        mx = [s for s, n in zip(scales, fp8, strict=True) if s is not None and s.dtype == "U8"
              and s.shape == (*tensors[n].shape[:-1], tensors[n].shape[-1] // MX_BLOCK)]
        if len(mx) == len(fp8):
            return "mxfp8"
        ue8m0 = (isinstance(qc, dict) and str(qc.get("scale_fmt", "")).lower() == "ue8m0") or \
            any(s is not None and s.dtype in ("U8", "F8_E8M0") for s in scales)
        return "fp8_ue8m0" if ue8m0 else "fp8"
    linear = Counter(i.dtype for n, i in tensors.items() if n.endswith(".weight") and len(i.shape) == 2)
    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(linear.most_common(1)[0][0], "unknown") \
        if linear else "unknown"


def _moe(tensors: dict, config: dict, qc: dict | None, family) -> dict:
    packed = [n for n in tensors if n.endswith(".w13_weight")]
    canonical = [n for n in tensors if re.search(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$", n)]
    layers = {int(m.group(1)) for n in packed + canonical if (m := _LAYER_RE.match(n))}
    layout = "trtllm (FlashInfer pre-shuffled)" if packed else "canonical" if canonical else "none"
    if packed and canonical:
        layout = "mixed (pre-shuffled and canonical experts)"
    return {"layout": layout, "routed_experts": family.n_experts(config) if family else config.get("n_routed_experts"),
            "shared_experts": config.get("n_shared_experts") or 0, "moe_layers": len(layers),
            "layout_in_config": bool(isinstance(qc, dict) and qc.get("moe_weight_layout"))}


def _conversion(root: Path, problems: list[str]) -> dict:
    prov, why = read_json(root / PROVENANCE_FILE)
    if prov is None:
        if (root / STATE_DIR).is_dir():  # an mxconv run that has not written its completion marker
            reason = incomplete_reason(root) or f"{PROVENANCE_FILE} is {why}"
            if "rerun" not in reason:
                reason += "; rerun the same `mxconv convert` command to resume it"
            return {"by_mxconv": True, "complete": False, "status": f"incomplete: {reason}"}
        return {"by_mxconv": False, "complete": None, "status": "not an mxconv output"
                + (f" ({PROVENANCE_FILE} is {why})" if why != "missing" else "")}
    source = prov.get("source") if isinstance(prov.get("source"), dict) else {}
    recipe = prov.get("recipe") if isinstance(prov.get("recipe"), dict) else {}
    complete = prov.get("complete") is True and not problems
    status = "complete" if complete else (f"{PROVENANCE_FILE} present but files are damaged" if problems
                                          else f"{PROVENANCE_FILE} does not say complete")
    return {"by_mxconv": True, "complete": complete, "status": status, "mxconv_version": prov.get("mxconv_version"),
            "created": prov.get("created"), "recipe": recipe.get("name"), "scale_rule": recipe.get("scale_rule"),
            "source": {"path": source.get("path"), "format": source.get("format"), "mapping": source.get("mapping"),
                       "base_model": source.get("base_model")}}


def inspect_checkpoint(path: str | Path) -> dict:
    """A JSON-ready description of the checkpoint directory `path`."""
    root = Path(path)
    if not root.is_dir():
        raise MxconvError("not a directory", file=root)
    failures: list[Failure] = []
    dest = read_destination(root, failures)
    unfinished = (root / STATE_DIR).is_dir() and not (root / PROVENANCE_FILE).exists()
    if dest.config is None and not dest.tensors and not dest.unreadable and not unfinished:
        raise MxconvError(f"not a checkpoint: no readable {CONFIG_FILE} and no safetensors weights", file=root)
    if unfinished:  # mxconv writes the index and config.json last: missing, they are the interruption itself
        failures = [f for f in failures if not (f.file == str(root) and f.tensor is None)
                    and not (f.file == str(root / CONFIG_FILE) and f.message.endswith(" is missing"))]
    config = dest.config or {}
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else None
    tensors = dest.tensors
    problems = [f"{f.tensor or Path(f.file).name if f.file else ''}: {f.message}".lstrip(": ") for f in failures]
    by_dtype: dict[str, dict] = {}
    for info in tensors.values():
        entry = by_dtype.setdefault(info.dtype, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += info.nbytes
    num_layers = int(config.get("num_hidden_layers") or 0)
    mtp_layers = {int(m.group(1)) for n in tensors if (m := _LAYER_RE.match(n)) and int(m.group(1)) >= num_layers}
    precision = _precision(tensors, qc)
    if dest.config is None:
        loads_in = _NO_CONFIG
    else:
        loads_in = who_loads(qc, precision) if precision != "unknown" else "unknown"
    kept = []
    if precision not in ("bf16", "fp16", "fp32", "unknown"):
        kept = sorted({n[: -len(".weight")] for n, i in tensors.items() if n.endswith(".weight") and len(i.shape) == 2
                       and i.dtype in HIGH_PRECISION_DTYPES and "embed_tokens" not in n}, key=natural_key)
    verify, why = read_json(root / VERIFY_REPORT_FILE)
    archs = config.get("architectures") or []
    family = family_or_none(config)
    return {
        "path": str(root),
        "config_read": dest.config is not None,
        "architecture": archs[0] if archs else None,
        "model_type": config.get("model_type"),
        "family": family.name if family else None,
        "hidden_layers": num_layers or None,
        "mtp": {"layers_in_config": family.n_mtp(config) if family else config.get("num_nextn_predict_layers", 0),
                "present": bool(mtp_layers) if num_layers else None},
        "precision": precision,
        "quantization": ({k: qc.get(k) for k in ("quant_method", "fmt", "weight_block_size", "scale_fmt",
                                                 "activation_scheme") if k in qc} if qc else None),
        "moe": _moe(tensors, config, qc, family),
        "tensors": {"count": len(tensors), "by_dtype": dict(sorted(by_dtype.items()))},
        "size": {"tensor_bytes": sum(i.nbytes for i in tensors.values()), "files": len(dest.files),
                 "file_bytes": sum(p.stat().st_size for p in dest.files if p.exists()),
                 "index_total_size": dest.index_total_size},
        "high_precision_linears": kept,
        "modules_to_not_convert": qc.get("modules_to_not_convert") if qc else None,
        "loads_in": loads_in,
        "conversion": _conversion(root, problems),
        "verified": None if verify is None else verify.get("passed") is True,
        "problems": problems,
    }


def _modules(names: list[str] | None) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:_SHOWN_MODULES])
    return f"{len(names)}: {shown}" + (f", ... (+{len(names) - _SHOWN_MODULES})" if len(names) > _SHOWN_MODULES else "")


def format_inspect(info: dict) -> str:
    """The `mxconv inspect` table."""
    q = info["quantization"]
    moe = info["moe"]
    conv = info["conversion"]
    size = info["size"]
    precision = info["precision"]
    mtp = {None: "unknown", True: "present", False: "absent"}[info["mtp"]["present"]]
    rows = [("path", info["path"])]
    if info["config_read"]:
        rows += [
            ("architecture", f"{info['architecture']} ({info['model_type']}), {info['hidden_layers']} decoder layers"),
            ("family", f"{info['family']}" if info["family"] else "unknown to mxconv"),
            ("MTP layer", mtp + f" (num_nextn_predict_layers {info['mtp']['layers_in_config']})"),
            ("precision", precision),
            ("quantization", "none" if not q else ", ".join(f"{k} {v}" for k, v in q.items())),
            ("MoE", f"{moe['layout']}; {moe['routed_experts']} routed + {moe['shared_experts']} shared experts in "
                    f"{moe['moe_layers']} layers" if moe["layout"] != "none" else "none"),
        ]
    else:  # what the tensors alone say
        rows += [(CONFIG_FILE, "none readable: architecture, family, MTP and quantization unknown"),
                 ("precision", precision),
                 ("MoE", f"{moe['layout']} in {moe['moe_layers']} layers" if moe["layout"] != "none" else "none")]
    rows += [
        ("tensors", f"{info['tensors']['count']}" + "".join(
            f"{', ' if i else ': '}{d} {v['count']} ({format_size(v['bytes'])})"
            for i, (d, v) in enumerate(info["tensors"]["by_dtype"].items()))),
        ("size", f"{format_size(size['tensor_bytes'])} of tensors in {size['files']} file(s)"
                 + ("" if size["index_total_size"] in (None, size["tensor_bytes"])
                    else f"; index total_size says {size['index_total_size']}")),
        ("kept in high precision", "unknown" if precision == "unknown" else "everything (not quantized)"
         if precision in ("bf16", "fp16", "fp32") else _modules(info["high_precision_linears"])),
    ]
    listed = info["modules_to_not_convert"]
    if listed is not None:
        one = per_layer_entries(listed)
        generic = [e for e in listed if e not in one]
        same = sorted(one, key=natural_key) == info["high_precision_linears"]
        rows.append(("modules_to_not_convert", (f"the same {len(one)} modules" if same and one else _modules(one))
                     + (f", and for every layer: {', '.join(generic)}" if generic else "")))
    rows.append(("loads in", info["loads_in"]))
    if conv["by_mxconv"]:
        src = conv.get("source") or {}
        rows.append(("conversion", conv["status"]))
        if conv.get("recipe"):
            rows.append(("converted from", f"{src.get('base_model') or src.get('path')} ({src.get('format')}, "
                                           f"mapping {src.get('mapping')}) with recipe {conv['recipe']}, "
                                           f"mxconv {conv.get('mxconv_version')}"))
        unverified = "no (run `mxconv verify SRC DST`)" if conv["complete"] is not False else "no"
        rows.append(("verified", {None: unverified, True: "passed",
                                  False: "FAILED (see mxconv_verify.json)"}[info["verified"]]))
    else:
        rows.append(("conversion", conv["status"]))
    rows.append(("problems", "none" if not info["problems"] else f"{len(info['problems'])}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"  - {p}" for p in info["problems"][:20]]
    if len(info["problems"]) > 20:
        lines.append(f"  ... and {len(info['problems']) - 20} more (--json shows all)")
    return "\n".join(lines)


def exit_status(info: dict) -> int:
    """`mxconv inspect`'s exit status for `info`: 1 when it lists problems or an unfinished (or
    damaged) mxconv conversion, else 0; the report is printed either way."""
    return 1 if info["problems"] or info["conversion"]["complete"] is False else 0
