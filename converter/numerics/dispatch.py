"""The numerics the converter calls: each function returns exactly the bytes of its namesake in
`converter.numerics.reference`, through the fastest implementation that can give them (the
compiled CPU kernels or the torch kernels of `converter.numerics.kernels`), and falls back to the
reference where those decline (NaN/Inf, scales they cannot handle exactly, odd shapes)."""

from __future__ import annotations

import torch

from converter.numerics import kernels, reference
from converter.numerics.reference import MX_BLOCK, FP8_TILE, ScaleRule, ScaleZeroBlocks


def _flushed(pair: tuple[torch.Tensor, torch.Tensor], scale_zero: ScaleZeroBlocks | str, negative
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels compute ScaleZeroBlocks.EXACT; FLUSH is a post-pass over the blocks with scale
    byte 0 (rare: none at all in most weights, and then it costs one look at the scales).
    `negative()`: the input's sign bits. The kernels decline NaN/Inf, so there is nothing to keep."""
    q, s = pair
    if ScaleZeroBlocks(scale_zero) is ScaleZeroBlocks.EXACT or not bool((s == 0).any()):
        return q, s
    return reference.flush_scale_zero_blocks(q, s, negative()), s


def quantize_mxfp8(x: torch.Tensor, rule: ScaleRule | str = ScaleRule.RCEIL, *, allow_nonfinite: bool = False,
                   name: str | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   scale_zero: ScaleZeroBlocks | str = ScaleZeroBlocks.EXACT) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.quantize_mxfp8`, about 10x faster on BF16 input (the kernels decline NaN/Inf)."""
    if x.dtype == torch.bfloat16 and x.numel() and x.shape[-1] % MX_BLOCK == 0:
        fast = kernels.quantize_bf16(x, ScaleRule(rule).value, out)
        if fast is not None:
            return _flushed(fast, scale_zero, lambda: torch.signbit(x))
    return reference.quantize_mxfp8(x, rule, allow_nonfinite=allow_nonfinite, name=name, scale_zero=scale_zero)


def dequantize_mxfp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`reference.dequantize_mxfp8` without torch's scalar float8 cast."""
    if data.dtype == torch.float8_e4m3fn and data.shape[-1] % MX_BLOCK == 0 and scale.dtype == torch.uint8:
        fast = kernels.dequantize_mxfp8(data, scale)
        if fast is not None:
            return fast.to(dtype)
    return reference.dequantize_mxfp8(data, scale, dtype)


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """`reference.dequantize_fp8_block` without torch's slow float8 casts."""
    scales = tile_scales(scale_inv)
    if scales is not None and weight.dtype == torch.float8_e4m3fn and weight.numel():
        fast = kernels.dequantize_fp8(weight, scales, out)
        if fast is not None:
            return fast
    return reference.dequantize_fp8_block(weight, scale_inv)


def requantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, rule: ScaleRule | str = ScaleRule.RCEIL,
                         *, allow_nonfinite: bool = False, name: str | None = None,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None,
                         scale_zero: ScaleZeroBlocks | str = ScaleZeroBlocks.EXACT) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.requantize_fp8_block` in one pass with no BF16 tensor where the kernels can be exact."""
    scales = tile_scales(scale_inv)
    if scales is not None and weight.dtype == torch.float8_e4m3fn and weight.numel():
        fast = kernels.requantize_fp8(weight, scales, ScaleRule(rule).value, out)
        if fast is not None:
            return _flushed(fast, scale_zero, lambda: _fp8_value_signs(weight, scales))
    return quantize_mxfp8(dequantize_fp8_block(weight, scale_inv), rule, allow_nonfinite=allow_nonfinite, name=name,
                          scale_zero=scale_zero)


def tile_scales(scale_inv: torch.Tensor) -> torch.Tensor | None:
    """The float32 tile scales the reference multiplies by (float32 as stored; UE8M0 exponent bytes
    as 2^(e - 127)), or None for a dtype the reference itself rejects."""
    if scale_inv.dtype in (torch.float32, torch.uint8, getattr(torch, "float8_e8m0fnu", None)):
        return reference.tile_scales_f32(scale_inv)
    return None


def _fp8_value_signs(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Sign bits of DeepSeek's BF16 values code * scale_inv: the code's sign XOR its tile scale's."""
    n, k = weight.shape
    tile_sign = torch.signbit(scale_inv).repeat_interleave(FP8_TILE, dim=0)[:n]
    tile_sign = tile_sign.repeat_interleave(FP8_TILE, dim=1)[:, :k]
    return ((weight.view(torch.uint8) & 0x80) != 0) ^ tile_sign
