"""The checkpoints `scripts/bench.py` converts: DeepSeek V3 matrix dimensions, BF16 and the FP8
release format (128x128 float32 tile scales), and a Megatron torch_dist (DCP) copy of the BF16
one. Built once per work folder; values cut from one Gaussian pool (building is I/O-bound)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from converter.files import INDEX_FILE
from converter.models.demo import TINY_CONFIG, is_fp8_release_linear, quantize_fp8_block, tensor_shapes

# Real DeepSeek V3 matrix dimensions (layer 0 dense with intermediate 18432, layers 1-2 MoE with 16
# routed experts of 2048): fewer layers and experts than the real model (1.3 TB), and a
# vocabulary of 24576 instead of 129280 so that the embeddings do not dominate. FP8 comes to
# 3.16 GB, BF16 to 5.62 GB.
FULL_CONFIG = dict(
    TINY_CONFIG, _name_or_path="mxconv/bench-deepseek-v3", vocab_size=24576, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=128, num_key_value_heads=128, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=8, n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0,
    max_position_embeddings=4096)
QUICK_CONFIG = dict(
    FULL_CONFIG, vocab_size=2048, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8, q_lora_rank=384, kv_lora_rank=256,
    num_experts_per_tok=2, n_group=2, topk_group=1)


# ----------------------------------------------------------------------------- the checkpoints

_POOL_ELEMS = 1 << 26  # Gaussian BF16 values every tensor is cut from: building is I/O-bound


class _Gaussian:
    """Standard normal BF16 values, cut from one pool at random offsets (fast and realistic
    enough: per-block statistics are those of a Gaussian weight)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(_POOL_ELEMS, generator=self.gen, dtype=torch.bfloat16)

    def take(self, shape: tuple[int, ...], std: float, base: float = 0.0) -> torch.Tensor:
        n = math.prod(shape)
        start = int(torch.randint(0, _POOL_ELEMS, (1,), generator=self.gen))
        parts, left = [], n
        while left:
            k = min(left, _POOL_ELEMS - start)
            parts.append(self.pool[start:start + k])
            left, start = left - k, 0
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return (flat.view(shape) * std + base).to(torch.bfloat16)


def _fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's release format (e4m3 + float32 128x128 scale_inv), one 128-row band at a time."""
    n, k = w.shape
    if n % 128 or k % 128:
        return quantize_fp8_block(w)
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn)
    scales = torch.empty((n // 128, k // 128), dtype=torch.float32)
    for b in range(n // 128):
        band = w[b * 128:(b + 1) * 128].float().view(128, k // 128, 128)
        s = band.abs().amax(dim=(0, 2)).clamp(min=1e-12) / 448.0
        scales[b] = s
        q[b * 128:(b + 1) * 128] = (band / s[None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(128, k)
    return q, scales


def _stored(config: dict, precision: str):
    """(name, shape, dtype, fp8) of every source tensor, in checkpoint order."""
    for name, (shape, dtype) in tensor_shapes(config).items():
        yield name, shape, dtype, precision == "fp8" and is_fp8_release_linear(name)


def _nbytes(shape, dtype, fp8: bool) -> int:
    if fp8:
        return shape[0] * shape[1] + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128) * 4
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def source_size(config: dict, precision: str) -> int:
    """Bytes of the weights `build_source` writes for `config` (checked against the free disk first)."""
    return sum(_nbytes(*t[1:]) for t in _stored(config, precision))


def build_source(root: Path, config: dict, precision: str, shards: int, seed: int = 0) -> dict:
    """A DeepSeek V3 checkpoint in `shards` files of about equal size (a weight and its scale
    in the same file, as in the release), built one shard at a time."""
    root.mkdir(parents=True, exist_ok=True)
    items = list(_stored(config, precision))
    total = sum(_nbytes(s, d, f) for _, s, d, f in items)
    groups: list[list[tuple]] = [[]]
    done = 0
    for item in items:
        if groups[-1] and done >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(item)
        done += _nbytes(*item[1:])
    rng = _Gaussian(seed)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, dtype, fp8 in group:
            if len(shape) == 1:
                t = rng.take(shape, 0.05, 1.0 if name.endswith("norm.weight") else 0.0).to(dtype)
            else:
                t = rng.take(shape, 1.0 / shape[1] ** 0.5).to(dtype)
            if fp8:
                tensors[name], tensors[name + "_scale_inv"] = _fp8_block(t)
            else:
                tensors[name] = t
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    cfg = dict(config)
    if precision == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}) + "\n")
    return source_facts(root)


def source_facts(root: Path, pattern: str = "*.safetensors") -> dict:
    """Sizes of the source in `root`; its weight files are those matching `pattern`."""
    files = sorted(root.glob(pattern))
    return {"path": str(root), "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
            "weight_bytes": sum(p.stat().st_size for p in files), "shards": len(files),
            "largest_shard_bytes": max(p.stat().st_size for p in files)}


def build_dcp_source(root: Path, hf_src: Path) -> dict:
    """A Megatron torch_dist checkpoint (2 gloo ranks, Megatron chunking, vocabulary padded to a
    multiple of 256) holding the weights of the BF16 source `hf_src`."""
    from converter.models.dcp_demo import build_dcp_checkpoints

    vocab = json.loads((hf_src / "config.json").read_text())["vocab_size"]
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_dcp_checkpoints(hf_src, [{"kind": "megatron", "padded_vocab": -(-vocab // 256) * 256 + 256, "dst": tmp,
                                           "transposed": False}])  # Megatron saves contiguous chunks
    tmp.rename(root)
    return source_facts(root, "*.distcp")
