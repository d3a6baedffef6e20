"""DeepSeek-V3-shaped checkpoints built from a config: the real tensor names and shape rules,
any dimensions. `mxconv demo` uses a tiny one; tests and benchmarks use the same builder.

FP8 variants are made with a 128x128 block quantizer of our own, in the release format
(float32 scale_inv, or power-of-two UE8M0 scales as float32 or uint8 exponents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from converter.files import INDEX_FILE

TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "_name_or_path": "mxconv/tiny-deepseek-v3",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,  # SGLang's deepseek_v2.py reads it without a default; every real V3 config has it
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    # SGLang's CPU rope path needs it; real V3 configs have YaRN (factor 40), scaled here to the tiny context
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# Linear modules the DeepSeek FP8 release stores in FP8 (everything else stays high precision).
_FP8_RELEASE_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                        "gate_proj", "up_proj", "down_proj")


def tensor_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a BF16 DeepSeek V3 checkpoint with this config: name -> (shape, dtype)."""
    c = config
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    bf16, f32 = torch.bfloat16, torch.float32
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((c["vocab_size"], h), bf16)}
    n_layers = c["num_hidden_layers"]
    for layer in range(n_layers + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{layer}."
        t = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        a = "self_attn."
        if c.get("q_lora_rank"):
            t[a + "q_a_proj.weight"] = (c["q_lora_rank"], h)
            t[a + "q_a_layernorm.weight"] = (c["q_lora_rank"],)
            t[a + "q_b_proj.weight"] = (heads * qk, c["q_lora_rank"])
        else:
            t[a + "q_proj.weight"] = (heads * qk, h)
        t[a + "kv_a_proj_with_mqa.weight"] = (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        t[a + "kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
        t[a + "kv_b_proj.weight"] = (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        t[a + "o_proj.weight"] = (h, heads * c["v_head_dim"])
        if layer < c["first_k_dense_replace"]:
            t.update(_mlp("mlp.", h, c["intermediate_size"]))
        else:
            i = c["moe_intermediate_size"]
            t["mlp.gate.weight"] = (c["n_routed_experts"], h)
            for e in range(c["n_routed_experts"]):
                t.update(_mlp(f"mlp.experts.{e}.", h, i))
            t.update(_mlp("mlp.shared_experts.", h, i * c["n_shared_experts"]))
        if layer >= n_layers:  # MTP / NextN layer
            t.update({"embed_tokens.weight": (c["vocab_size"], h), "enorm.weight": (h,), "hnorm.weight": (h,),
                      "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
                      "shared_head.head.weight": (c["vocab_size"], h)})
        out.update({p + k: (v, bf16) for k, v in t.items()})
        if layer >= c["first_k_dense_replace"]:
            out[p + "mlp.gate.e_score_correction_bias"] = ((c["n_routed_experts"],), f32)
    out["model.norm.weight"] = ((h,), bf16)
    out["lm_head.weight"] = ((c["vocab_size"], h), bf16)
    return out


def _mlp(prefix: str, h: int, i: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (i, h), prefix + "up_proj.weight": (i, h), prefix + "down_proj.weight": (h, i)}


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms near 1, biases small
        base = 1.0 if name.endswith("norm.weight") else 0.0
        return (base + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    std = 1.0 / shape[1] ** 0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def is_fp8_release_linear(name: str) -> bool:
    parts = name.split(".")
    return name.endswith(".weight") and len(parts) >= 2 and parts[-2] in _FP8_RELEASE_LINEARS


def quantize_fp8_block(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A 128x128 block quantizer in DeepSeek's release format: (e4m3 [N, K], float32 scale_inv)."""
    n, k = w.shape
    tn, tk = -(-n // 128), -(-k // 128)
    padded = torch.zeros(tn * 128, tk * 128, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(tn, 128, tk, 128)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(tn * 128, tk * 128)[:n, :k].contiguous(), scale.to(torch.float32)


def build_checkpoint(root: str | Path, config: dict | None = None, *, precision: str = "bf16", shards: int = 3,
                     seed: int = 0, interleave: bool = True, ue8m0_as_uint8: bool = False,
                     extra_files: bool = True) -> Path:
    """Write a DeepSeek V3 checkpoint to `root`.

    precision: "bf16", "fp8" (float32 scale_inv) or "fp8_ue8m0" (power-of-two scales).
    interleave: deal tensors round-robin over the shards, so weights and their scales, and gate
    and up of an expert, land in different files (as the real release does for some tensors).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = dict(config or TINY_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in tensor_shapes(config).items():
        t = make_tensor(name, shape, dtype, gen)
        if precision != "bf16" and is_fp8_release_linear(name):
            q, s = quantize_fp8_block(t, ue8m0=precision == "fp8_ue8m0")
            if precision == "fp8_ue8m0" and ue8m0_as_uint8:
                s = ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
            tensors[name], tensors[name + "_scale_inv"] = q, s
        else:
            tensors[name] = t
    if precision != "bf16":
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if precision == "fp8_ue8m0":
            qc["scale_fmt"] = "ue8m0"
        config["quantization_config"] = qc
    write_sharded(root, tensors, shards, interleave)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if extra_files:
        (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}) + "\n")
        (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
        (root / "LICENSE").write_text("Tiny synthetic checkpoint made by mxconv; no real weights.\n")
    return root


def write_sharded(root: Path, tensors: dict[str, torch.Tensor], shards: int, interleave: bool) -> None:
    names = list(tensors)
    if interleave:
        groups = [names[i::shards] for i in range(shards)]
    else:
        per = -(-len(names) // shards)
        groups = [names[i * per:(i + 1) * per] for i in range(shards)]
    groups = [g for g in groups if g]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(root / fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
