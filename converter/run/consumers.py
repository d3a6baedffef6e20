"""What the output's consumers need from its config, and who can load which layout.

Facts from the consumers' own loading code, run on CPU by tests/test_sglang_loader.py
(SGLang 0.5.23, transformers 5.x): the skip list every SGLang version reads right, and the one
sentence that `inspect`, the conversion summary and the model card give about who loads a
checkpoint (for FP8 release sources, what the consumers' documentation says: mxconv's tests load
only its own outputs). Pure functions of names and config dicts.
"""

from __future__ import annotations

# Skip-list entries that name a module of every layer. SGLang's MTP draft model
# (DeepseekV3ForCausalLMNextN) renames only `model.layers.61` to `model.decoder`, skip list
# included, so for an MTP layer at any other index the per-layer entry never matches there and
# SGLang casts the BF16 weight into an MXFP8 layer (sglang#34906). Consumers match an entry on
# dotted-path boundaries anywhere in the name (SGLang 0.5.23), as a substring (older SGLang), or
# as a name suffix (transformers): each reads this one the same way.
LAYER_AGNOSTIC_SKIPS = ("self_attn.kv_b_proj",)


def skip_list(modules: list[str]) -> list[str]:
    """`modules_to_not_convert` for the config: the per-layer modules, then each layer-agnostic
    entry that names a kept module (only modules that stay BF16 in every layer are in
    LAYER_AGNOSTIC_SKIPS); idempotent, so a list read back from a config gives itself."""
    per_layer = per_layer_entries(modules)
    return per_layer + [g for g in LAYER_AGNOSTIC_SKIPS if any(m.endswith("." + g) for m in per_layer)]


def consumer_keys(skip: list[str], scale_name: str) -> dict:
    """quantization_config keys besides SGLang's and transformers' own: `ignored_layers` (the
    skip list under the key SGLang reads first, and the one some vLLM releases read for mxfp8);
    and for `weight_scale`-named checkpoints the keys vLLM's ModelOpt MXFP8 config reads from a
    config.json (`quant_algo` MXFP8, the skip list as `ignore`). tests/test_sglang_loader.py
    shows SGLang and transformers load a checkpoint with all of them exactly as without."""
    keys = {"ignored_layers": list(skip)}
    if scale_name == "weight_scale":
        keys.update({"quant_algo": "MXFP8", "ignore": list(skip)})
    return keys


def per_layer_entries(entries: list[str]) -> list[str]:
    """The entries of a skip list that name one module (the layer-agnostic ones left out)."""
    return [e for e in entries if e not in LAYER_AGNOSTIC_SKIPS]


CANONICAL_LOADERS = ("SGLang (quant_method mxfp8; serves MXFP8 on Blackwell SM100 or ROCm gfx950), "
                     "transformers 5.x (its mxfp8 support; dequantizes to BF16 without a GPU)")
VLLM_LOADERS = ("SGLang (it renames weight_scale to weight_scale_inv when it loads), vLLM (quant_method mxfp8 -> "
                "ModelOpt MXFP8: weight_scale, quant_algo, ignore; Marlin kernels from SM80, so Hopper too); "
                "NOT transformers 5.x (it reads only weight_scale_inv and would leave the weights unscaled)")
PRESHUFFLED_LOADERS = ("NOT SGLang: SGLang shuffles canonical experts itself when it loads them, ignores "
                       "moe_weight_layout and leaves these pre-shuffled experts unloaded (a warning, then "
                       "wrong weights); nor transformers or vLLM. Only a loader that hands the experts to "
                       "FlashInfer's TRT-LLM MXFP8 MoE kernel as they are (converter.models.trtllm_moe) "
                       "can use it; `mxconv unshuffle` gives the canonical checkpoint SGLang loads")
FP8_BLOCK_LOADERS = ("SGLang, vLLM and transformers (fine-grained FP8) load it as block FP8, not as MXFP8 (so their "
                     "documentation says; mxconv's tests load only its own outputs); `mxconv convert` makes the "
                     "MXFP8 checkpoint")
FLOAT8_WEIGHTS = ("mxfp8", "fp8", "fp8_ue8m0")  # what `mxconv inspect` calls checkpoints with float8 weights


def who_loads(quantization_config: dict | None, precision: str | None = None) -> str:
    """One sentence: which consumers load a checkpoint with this quantization_config. `precision`
    (`mxconv inspect`'s name for what the weights are) tells a BF16 checkpoint from one whose
    float8 weights have no quantization_config."""
    qc = quantization_config if isinstance(quantization_config, dict) else {}
    if qc.get("moe_weight_layout"):
        return PRESHUFFLED_LOADERS
    if not qc:
        if precision in FLOAT8_WEIGHTS:
            return f"unknown: {precision} weights but no quantization_config saying how to read them"
        if precision in ("fp16", "fp32"):
            return f"any loader of unquantized {precision.upper()} weights (not quantized)"
        return "any BF16 loader (not quantized)"
    method = str(qc.get("quant_method", "")).lower()
    if method == "mxfp8":
        return VLLM_LOADERS if qc.get("quant_algo") == "MXFP8" else CANONICAL_LOADERS
    block = qc.get("weight_block_size")
    if method == "fp8" and isinstance(block, (list, tuple)) and list(block) == [128, 128]:
        fmt = ", UE8M0 scales" if str(qc.get("scale_fmt", "")).lower() == "ue8m0" else ""
        return f"the DeepSeek FP8 release format (quant_method fp8, 128x128 blocks{fmt}): " + FP8_BLOCK_LOADERS
    what = f"quant_method {qc.get('quant_method')!r}" + (f", weight_block_size {block!r}" if block is not None else "")
    return f"unknown quantization ({what}): mxconv cannot say which consumers load it"
