"""Load a TRT-LLM pre-shuffled output's experts for FlashInfer's TRT-LLM MXFP8 MoE kernel.

An output of the `*_mxfp8_trtllm` recipes is not an SGLang checkpoint (SGLang shuffles
canonical experts itself at load time and leaves pre-shuffled ones unloaded); its consumer is a
loader of its own that hands the experts to the kernel as they are. This is that loader, one MoE
layer at a time:

    from converter.models.trtllm_moe import load_moe_layer
    w = load_moe_layer("DeepSeek-V3-MXFP8-TRTLLM", layer=3, device="cuda")
    out = flashinfer.fused_moe.trtllm_fp8_block_scale_moe(
        routing_logits, routing_bias, hidden_states, hidden_states_scale,  # MXFP8 activations
        **w.kernel_args(),            # gemm1_weights ... gemm2_weights_scale, sizes, expert range
        num_experts=..., top_k=..., n_group=..., topk_group=..., routed_scaling_factor=...,
        routing_method_type=..., use_shuffled_weight=True, weight_layout=0,  # WeightLayout.MajorK
        fp8_quantization_type=Fp8QuantizationType.MxFp8)

The tensors are exactly the kernel's arguments (FlashInfer's Python signature, the MxFp8 path
SGLang 0.5.23 calls in layers/moe/moe_runner/flashinfer_trtllm.py):
    gemm1_weights        float8_e4m3fn [E, 2I, H]    per expert: rows of [up; gate], gated-interleaved,
                                                     then shuffled for epilogue tile 128
    gemm1_weights_scale  uint8 (E8M0)  [E, 2I, H/32] the same row order, 128x4-swizzled, stored with
                                                     the unswizzled shape (as SGLang keeps it)
    gemm2_weights        float8_e4m3fn [E, H, I]     rows shuffled for epilogue tile 128
    gemm2_weights_scale  uint8 (E8M0)  [E, H, I/32]  same rows, 128x4-swizzled
[up; gate] is what SGLang itself hands the kernel: with a flashinfer_trtllm MoE backend its
FusedMoE loads w3 (up) before w1 (gate) for Fp8MoEMethod, then gated-interleaves and shuffles
(align_mxfp8_moe_weights_for_flashinfer_trtllm); vLLM's ModelOpt MXFP8 swaps to W31 likewise.
Experts are the checkpoint's experts 0..E-1 of the layer (all of them: the layout is valid for
expert parallelism only; a rank serving experts [a, b) slices dim 0 and passes
local_expert_offset=a). Nothing is converted: every byte is the file's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import SourceError
from converter.files import CONFIG_FILE
from converter.numerics.trtllm_layout import LAYOUT_METADATA, MXFP8_BLOCK, PACKED_TENSOR_SUFFIXES
from converter.sources.checkpoint import SourceCheckpoint

_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.w13_weight$")


@dataclass(frozen=True)
class MoeLayerWeights:
    """One MoE layer's routed experts, in the kernel's argument layout (see the module doc)."""

    layer: int
    gemm1_weights: torch.Tensor
    gemm1_weights_scale: torch.Tensor
    gemm2_weights: torch.Tensor
    gemm2_weights_scale: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.gemm1_weights.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.gemm2_weights.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.gemm2_weights.shape[1]

    def kernel_args(self) -> dict:
        """The keyword arguments of trtllm_fp8_block_scale_moe that the weights determine."""
        return {"gemm1_weights": self.gemm1_weights, "gemm1_weights_scale": self.gemm1_weights_scale,
                "gemm2_weights": self.gemm2_weights, "gemm2_weights_scale": self.gemm2_weights_scale,
                "intermediate_size": self.intermediate_size, "local_expert_offset": 0,
                "local_num_experts": self.num_experts}


def _open_preshuffled(checkpoint: str | Path | SourceCheckpoint) -> SourceCheckpoint:
    ckpt = checkpoint if isinstance(checkpoint, SourceCheckpoint) else SourceCheckpoint.open(checkpoint)
    layout = (ckpt.config.get("quantization_config") or {}).get("moe_weight_layout") or {}
    if layout.get("format") != LAYOUT_METADATA["format"]:
        raise SourceError("not a TRT-LLM pre-shuffled checkpoint: quantization_config has no moe_weight_layout "
                          f"of format {LAYOUT_METADATA['format']!r} (canonical experts: SGLang loads it as is)",
                          file=ckpt.root / CONFIG_FILE)
    return ckpt


def moe_layers(checkpoint: str | Path | SourceCheckpoint) -> list[int]:
    """The layers (MTP layers included) whose routed experts are stored pre-shuffled."""
    ckpt = _open_preshuffled(checkpoint)
    return sorted({int(m.group(1)) for n in ckpt.tensors if (m := _EXPERT_RE.match(n))})


def load_moe_layer(checkpoint: str | Path | SourceCheckpoint, layer: int,
                   device: str | torch.device = "cpu") -> MoeLayerWeights:
    """Layer `layer`'s experts stacked for the kernel; SourceError naming the file and tensor
    when the checkpoint is not pre-shuffled, lacks the layer or an expert, or holds a tensor
    of another dtype or shape."""
    ckpt = _open_preshuffled(checkpoint)
    experts = sorted(int(m.group(2)) for n in ckpt.tensors if (m := _EXPERT_RE.match(n)) and int(m.group(1)) == layer)
    if not experts:
        raise SourceError(f"no pre-shuffled experts in layer {layer} (MoE layers: {moe_layers(ckpt)})",
                          file=ckpt.root / CONFIG_FILE)
    if experts != list(range(len(experts))):
        missing = sorted(set(range(experts[-1] + 1)) - set(experts))[0]
        raise SourceError(f"layer {layer} lacks expert {missing}",
                          tensor=f"model.layers.{layer}.mlp.experts.{missing}.w13_weight", file=ckpt.root)
    stacks = {}
    for key, suffix in PACKED_TENSOR_SUFFIXES.items():
        want = torch.uint8 if key.endswith("scale") else torch.float8_e4m3fn
        parts = []
        for e in experts:
            name = f"model.layers.{layer}.mlp.experts.{e}.{suffix}"
            if name not in ckpt.tensors:
                raise SourceError("pre-shuffled expert tensor missing", tensor=name, file=ckpt.root)
            t = ckpt.load(name)
            if t.dtype != want or t.dim() != 2 or (parts and t.shape != parts[0].shape):
                raise SourceError(f"expected {want} 2-D like expert 0's, got {t.dtype} {list(t.shape)}",
                                  tensor=name, file=ckpt.tensors[name].file)
            parts.append(t)
        stacks[key] = torch.stack(parts).to(device)
    (e, two_i, h), (_, h2, i) = stacks["gemm1_weight"].shape, stacks["gemm2_weight"].shape
    if two_i != 2 * i or h2 != h or stacks["gemm1_scale"].shape[1:] != (two_i, h // MXFP8_BLOCK) \
            or stacks["gemm2_scale"].shape[1:] != (h, i // MXFP8_BLOCK):
        raise SourceError(f"layer {layer}: w13 {[e, two_i, h]}, w2 {[e, h2, i]} and their scales do not form "
                          "one MoE layer", tensor=f"model.layers.{layer}.mlp.experts.0.w13_weight", file=ckpt.root)
    return MoeLayerWeights(layer, stacks["gemm1_weight"], stacks["gemm1_scale"], stacks["gemm2_weight"],
                           stacks["gemm2_scale"])
