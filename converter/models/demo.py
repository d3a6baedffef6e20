"""Checkpoints of any supported model family built from a config: the real tensor names and shape
rules of the family (families/*.yaml), any dimensions. `mxconv demo` uses a tiny one (the family's
`demo_config`); tests and benchmarks use the same builder.

FP8 variants are made with a 128x128 block quantizer of our own, in the release format
(float32 scale_inv, or power-of-two UE8M0 scales as float32 or uint8 exponents).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from converter.files import INDEX_FILE
from converter.models.family import Family, family_of, load_family


def tiny_config(family: str = "deepseek_v3") -> dict:
    """The tiny config of a family (its `demo_config`): real config keys, tiny sizes; a copy."""
    return copy.deepcopy(load_family(family).demo_config)


TINY_CONFIG = tiny_config("deepseek_v3")
_TORCH_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32}


def tensor_shapes(config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a BF16 checkpoint of the config's family: name -> (shape, dtype)."""
    return {n: (shape, _TORCH_DTYPES[dtype]) for n, (shape, dtype, _opt) in family_of(config).tensors(config).items()}


def describe_tiny(family: Family) -> str:
    """One line about the family's tiny demo model, for `mxconv demo`."""
    c = family.demo_config
    n = c["num_hidden_layers"]
    moe = sum(family.is_moe_layer(c, layer) for layer in range(n))
    mtp = family.n_mtp(c)
    shared = f" + {c['n_shared_experts']} shared" if c.get("n_shared_experts") else ""
    return (f"{n} decoder layers ({n - moe} dense, {moe} MoE with {family.n_experts(c)} routed experts{shared})"
            + (f" and {mtp} MTP layer{'s' * (mtp > 1)}" if mtp else ""))


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms near 1, biases small
        base = 1.0 if name.endswith("norm.weight") else 0.0
        return (base + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    std = 1.0 / shape[1] ** 0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def is_fp8_release_linear(name: str, family: str = "deepseek_v3") -> bool:
    return load_family(family).is_fp8_release_linear(name)


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
                     extra_files: bool = True, family: str | None = None) -> Path:
    """Write a checkpoint to `root`: of `config`'s family, or the tiny one of `family` (default
    DeepSeek V3).

    precision: "bf16", "fp8" (float32 scale_inv) or "fp8_ue8m0" (power-of-two scales).
    interleave: deal tensors round-robin over the shards, so weights and their scales, and gate
    and up of an expert, land in different files (as the real release does for some tensors).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config(family or "deepseek_v3"))
    fam = family_of(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in tensor_shapes(config).items():
        t = make_tensor(name, shape, dtype, gen)
        if precision != "bf16" and fam.is_fp8_release_linear(name):
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
