"""The model card (README.md) of a converted checkpoint, built from what the conversion left in
DST: the provenance (mxconv.json), config.json and, when `mxconv verify` ran, its report.

Every input is optional: a card for a half-documented folder says less, it does not fail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from converter import yaml_data
from converter.files import CONFIG_FILE, INDEX_FILE, PROVENANCE_FILE, VERIFY_REPORT_FILE
from converter.models.family import Family, family_or_none
from converter.run.consumers import PRESHUFFLED_LOADERS, who_loads
from converter.units import format_size

CARD_FILE = "README.md"
TP_SIZE = 8
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_PATH_RE = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")

_SOURCE_FORMATS = {
    "bf16": "BF16 (unquantized)",
    "fp8": "FP8 E4M3 with 128x128 block scales in FP32 (DeepSeek V3/R1 release format)",
    "fp8_ue8m0": "FP8 E4M3 with 128x128 power-of-two (UE8M0) block scales (DeepSeek V3.1 format)",
}
_SCALE_RULES = {
    "rceil": "RCEIL: each block scale is amax/448 rounded up to a power of two, the rule of "
    "TransformerEngine, FlashInfer and SGLang's online quantizer, so no block maximum is clipped",
    "floor": "FLOOR (OCP MX specification: 2^(floor(log2 amax) - 8)); it can clip the largest "
    "values of a block",
}


def write_model_card(dst: Path, *, overwrite: bool = False, repo_id: str | None = None) -> Path | None:
    """Write DST/README.md unless one exists (a user's own card is never replaced unless `overwrite`).

    A README.md that is a byte-for-byte copy of the source checkpoint's (the conversion copies side
    files) is the base model's card, not this checkpoint's, and is replaced.
    `repo_id` names the model in the serving command; without it the command uses DST's path.
    Returns the path written, or None when README.md already existed.
    """
    dst = Path(dst)
    path = dst / CARD_FILE
    if path.exists() and not overwrite and not _is_source_card(dst):
        return None
    text = render_model_card(dst, repo_id=repo_id)
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def render_model_card(dst: Path, *, repo_id: str | None = None) -> str:
    dst = Path(dst)
    prov = _read_json(dst / PROVENANCE_FILE)
    config = _read_json(dst / CONFIG_FILE)
    report = _read_json(dst / VERIFY_REPORT_FILE) if (dst / VERIFY_REPORT_FILE).exists() else None
    source, recipe, output = _dict(prov.get("source")), _dict(prov.get("recipe")), _dict(prov.get("output"))
    quant = _dict(config.get("quantization_config"))
    base_model = _base_model(source, config)
    family = family_or_none(config)
    title = repo_id.split("/")[-1] if repo_id else (f"{base_model.split('/')[-1]}-MXFP8" if base_model else dst.name)

    sections = [
        f"# {title}\n\n{_intro(base_model, prov, quant, family)}",
        _conversion_section(source, recipe, output),
        _kept_section(recipe, quant, output, family),
        _verification_section(report),
        _files_section(dst, output),
        _serving_section(repo_id or str(dst), config, recipe, quant),
    ]
    if recipe:
        sections.append(
            "## Recipe\n\nThe full recipe as resolved for this conversion (also in `mxconv.json`):\n\n"
            f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False).rstrip()}\n```"
        )
    meta = _front_matter(base_model, source, config, dst)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def sglang_command(model: str, *, config: dict) -> str:
    """The `sglang.launch_server` command line for this checkpoint.

    Flag names follow sglang's server_args.py: `--quantization mxfp8` (QUANTIZATION_CHOICES) and
    `--moe-runner-backend flashinfer_trtllm` (MXFP8_MOE_RUNNER_BACKEND_CHOICES, and the default
    SGLang resolves to for MXFP8 on CUDA).
    """
    quant = _dict(config.get("quantization_config"))
    args = [f"--model-path {model}", f"--tp-size {TP_SIZE}"]
    if "mxfp8" in str(quant.get("quant_method", "")):
        args += ["--quantization mxfp8", "--moe-runner-backend flashinfer_trtllm"]
    if config.get("auto_map"):
        # config.json points at modeling code shipped with the checkpoint.
        args.append("--trust-remote-code")
    return "python3 -m sglang.launch_server \\\n  " + " \\\n  ".join(args)


# --- sections ------------------------------------------------------------------------------------


def _intro(base_model: str | None, prov: dict, quant: dict, family: Family | None) -> str:
    of = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else \
        (f"a {family.description.split(' (')[0]} checkpoint" if family else "a checkpoint")
    if "mxfp8" in str(quant.get("quant_method", "")):
        what = (
            f"MXFP8 conversion of {of} for SGLang on NVIDIA Blackwell GPUs. Quantized weights are "
            "FP8 E4M3 with one power-of-two (E8M0) scale per 32 consecutive input elements, stored as "
            "the uint8 `weight_scale_inv` tensors SGLang loads as they are."
        )
    else:
        what = f"Conversion of {of} made with mxconv."
    made = []
    if prov.get("mxconv_version"):
        made.append(f"mxconv {prov['mxconv_version']}")
    if prov.get("created"):
        made.append(f"on {str(prov['created'])[:10]}")
    return what + (f" Converted with {' '.join(made)}." if made else "")


def _conversion_section(source: dict, recipe: dict, output: dict) -> str:
    rows = []
    fmt = source.get("format")
    if source.get("base_model") or fmt:
        parts = (_code(source.get("base_model")), _SOURCE_FORMATS.get(fmt, fmt))
        rows.append(("Source", ", ".join(x for x in parts if x)))
    if recipe.get("name"):
        rows.append(("Recipe", _code(recipe["name"])))
    if recipe.get("target"):
        target = recipe["target"]
        rows.append(("Target", "MXFP8: E4M3 values, E8M0 scale per 1x32 block" if target == "mxfp8" else target.upper()))
    if recipe.get("scale_rule"):
        rows.append(("Scale rule", _SCALE_RULES.get(recipe["scale_rule"], recipe["scale_rule"])))
    if fmt == "fp8":
        rows.append(("FP8 source", "dequantized as DeepSeek does (FP32 product rounded to BF16), then quantized"))
    elif fmt == "fp8_ue8m0":
        relayout = recipe.get("ue8m0_source", "relayout") == "relayout"
        rows.append(("FP8 source", "lossless re-layout: FP8 bytes kept, each tile exponent repeated for its 1x32 blocks"
                     if relayout else "requantized with the scale rule above (lossless in value)"))
    layout = recipe.get("moe_layout")
    if layout == "trtllm":
        rows.append(("MoE experts", "pre-shuffled for the FlashInfer TRT-LLM MoE kernels: not loadable by SGLang (see Who can load it)"))
    elif layout:
        rows.append(("MoE experts", "canonical HF layout (SGLang prepares them for its MoE backend at load time)"))
    tensors = _dict(output.get("tensors"))
    if tensors:
        labels = (("mxfp8", "MXFP8"), ("bf16", "BF16"), ("copied", "copied unchanged"))
        rows.append(("Tensors", ", ".join(f"{tensors[k]} {label}" for k, label in labels if k in tensors)))
    if not rows:
        return ""
    return "## Conversion\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _kept_section(recipe: dict, quant: dict, output: dict, family: Family | None) -> str:
    modules = quant.get("modules_to_not_convert") or output.get("modules_to_not_convert") or []
    if recipe.get("target") == "bf16":
        return "## Precision\n\nEvery weight is BF16: this recipe dequantizes and does not quantize."
    if not modules and not recipe:
        return ""
    lines = []
    if any("kv_b_proj" in m for m in [*modules, *(recipe.get("keep_bf16") or [])]):
        lines.append(
            "- `kv_b_proj` in every layer, the MTP layer included: MLA contracts it along one axis in "
            "absorbed attention and along the other in non-absorbed attention, and 1x32 blocks along one "
            "axis cannot serve both."
        )
    if family is not None and family.card_kept:
        lines.append(f"- {family.card_kept[0].upper()}{family.card_kept[1:]}.")
    extra = [p for p in recipe.get("keep_bf16") or [] if "kv_b_proj" not in p]
    if extra:
        lines.append("- Also kept by the recipe: " + ", ".join(_code(p) for p in extra) + ".")
    if recipe.get("keep_first_layers"):
        lines.append(f"- The first {recipe['keep_first_layers']} decoder layers, entirely.")
    if recipe.get("keep_last_layers"):
        lines.append(f"- The last {recipe['keep_last_layers']} decoder layers (before the MTP layer), entirely.")
    text = "## Kept in BF16\n\n" + "\n".join(lines)
    if modules:
        shown = ", ".join(_code(m) for m in modules[:3]) + (", ..." if len(modules) > 3 else "")
        text += (f"\n\n`quantization_config.modules_to_not_convert` lists the {len(modules)} unquantized "
                 f"linear modules ({shown}); SGLang loads them in BF16.")
    return text


def _verification_section(report: dict | None) -> str:
    if report is None:
        return "## Verification\n\nNot verified: this checkpoint was published without a `mxconv verify` report."
    passed = report.get("passed") is True
    status = "passed" if passed else "**FAILED** (published anyway, with `--force`)"
    lines = [f"`mxconv verify` {status}; the full report is `{VERIFY_REPORT_FILE}`.", ""]
    checks = _dict(report.get("checks"))
    if checks:
        lines += ["| Check | Result |", "|---|---|"]
        for name, check in checks.items():
            check = _dict(check)
            ok = check.get("passed")
            result = "passed" if ok is True else ("failed" if ok is False else "not run")
            failures = check.get("failures") or []
            if failures:
                result += f" ({len(failures)} failures)"
            lines.append(f"| {name} | {result} |")
        lines.append("")
    summary = _dict(report.get("summary"))
    if summary.get("min_sqnr_db") is not None:
        n = f" over {summary['tensors']} tensors" if summary.get("tensors") else ""
        lines.append(f"- Weight SQNR against the source{n}: min {_num(summary['min_sqnr_db'], 1)} dB, "
                     f"mean {_num(summary.get('mean_sqnr_db'), 1)} dB.")
    logits = _dict(summary.get("logits"))
    if logits:
        top1 = logits.get("top1_agreement")
        lines.append(f"- Logits against the source model: cosine {_num(logits.get('cosine'), 5)}, "
                     f"top-1 agreement {_num(100 * top1, 2) if isinstance(top1, (int, float)) else 'n/a'} %, "
                     f"KL {_num(logits.get('kl'), 5)}.")
    return "## Verification\n\n" + "\n".join(lines).rstrip()


def _files_section(dst: Path, output: dict) -> str:
    shards = sorted(p for p in dst.glob("*.safetensors") if p.is_file())
    total = sum(p.stat().st_size for p in shards) or output.get("total_size") or 0
    if not shards and not total:
        return ""
    count = len(shards) or output.get("shards") or 0
    lines = [f"- {count} safetensors shard{'s' if count != 1 else ''}, {format_size(total)} in all "
             f"(about {format_size(total / TP_SIZE)} of weights per GPU at tensor parallelism {TP_SIZE})."]
    if (dst / INDEX_FILE).exists():
        lines.append(f"- `{INDEX_FILE}` maps every tensor to its shard.")
    lines.append(f"- `{PROVENANCE_FILE}`: provenance (mxconv version, source shards and their sha256, "
                 "recipe, options).")
    if (dst / VERIFY_REPORT_FILE).exists():
        lines.append(f"- `{VERIFY_REPORT_FILE}`: the verification report.")
    return "## Files\n\n" + "\n".join(lines)


def _serving_section(model: str, config: dict, recipe: dict, quant: dict) -> str:
    if _is_preshuffled(quant, recipe):
        return (
            "## Who can load it: not SGLang\n\n"
            "**The routed experts are stored pre-shuffled for FlashInfer's TRT-LLM MXFP8 MoE kernel** "
            "(`quantization_config.moe_weight_layout`). " + PRESHUFFLED_LOADERS + ".\n\n"
            "Loading them for the kernel, layer by layer (every expert of a layer must be on the rank: "
            "expert parallelism only):\n\n"
            "```python\nfrom converter.models.trtllm_moe import load_moe_layer\n\n"
            "w = load_moe_layer(\"path/to/this/checkpoint\", layer=3)\n"
            "flashinfer.fused_moe.trtllm_fp8_block_scale_moe(..., **w.kernel_args(), "
            "use_shuffled_weight=True, fp8_quantization_type=Fp8QuantizationType.MxFp8)\n```"
        )
    return (
        "## Serving with SGLang\n\n"
        "MXFP8 needs NVIDIA Blackwell (SM100) GPUs. On one node of 8 GPUs:\n\n"
        f"```bash\n{sglang_command(model, config=config)}\n```\n\n"
        "`--quantization mxfp8` matches `quantization_config.quant_method`; `--moe-runner-backend "
        "flashinfer_trtllm` runs the experts on FlashInfer's TRT-LLM MXFP8 MoE kernels.\n\n"
        "Loads in: " + who_loads(quant) + "."
    )


# --- helpers -------------------------------------------------------------------------------------


def _front_matter(base_model: str | None, source: dict, config: dict, dst: Path) -> dict:
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta.update(_source_license(source, base_model, dst))
    meta["library_name"] = "sglang"
    meta["pipeline_tag"] = "text-generation"
    model_type = config.get("model_type") or "deepseek_v3"
    meta["tags"] = [model_type, "mxfp8", "fp8", "quantized", "sglang", "blackwell", "mxconv"]
    return meta


def _source_license(source: dict, base_model: str | None, dst: Path) -> dict:
    """license / license_name / license_link from the source checkpoint's own card, when it is local."""
    if not source.get("path"):
        return {}
    try:
        text = (Path(source["path"]) / CARD_FILE).read_text(encoding="utf-8")
        meta = yaml_data.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, IndexError, yaml.YAMLError):
        return {}
    if not isinstance(meta, dict) or not meta.get("license"):
        return {}
    out = {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    link = str(out.get("license_link", ""))
    if link and "://" not in link and not (dst / link).is_file():
        # A relative link names a file of the source repo that this one does not carry.
        if base_model:
            out["license_link"] = f"https://huggingface.co/{base_model}/blob/main/{link}"
        else:
            out.pop("license_link")
    return out


def _is_source_card(dst: Path) -> bool:
    source = _dict(_read_json(dst / PROVENANCE_FILE).get("source"))
    try:
        return bool(source.get("path")) and (
            (dst / CARD_FILE).read_bytes() == (Path(source["path"]) / CARD_FILE).read_bytes())
    except OSError:
        return False


def _base_model(source: dict, config: dict) -> str | None:
    for candidate in (source.get("base_model"), config.get("_name_or_path")):
        if isinstance(candidate, str) and _REPO_ID_RE.match(candidate):
            return candidate
    # A source inside the Hugging Face cache names its repo: .../models--{org}--{name}/snapshots/...
    m = _CACHE_PATH_RE.search(str(source.get("path") or ""))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _is_preshuffled(quant: dict, recipe: dict) -> bool:
    return bool(quant.get("moe_weight_layout")) or recipe.get("moe_layout") == "trtllm"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _code(value) -> str:
    return f"`{value}`" if value else ""


def _num(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"

