"""MXFP8 and DeepSeek FP8 numerics: pure functions of tensors, no I/O, any torch device.

Everything here is bit-exact by construction: scales are computed on the integer bit patterns
of float32 values, multiplications by powers of two are exact, and the only rounding steps are
the ones the reference implementations perform (float32 -> e4m3 and float32 -> bf16, both
round-to-nearest-even).
"""

from __future__ import annotations

import enum
import warnings

import torch

from converter.errors import NonFiniteWarning, NumericsError

MX_BLOCK = 32
E4M3_MAX = 448.0
FP8_TILE = 128
# float32(1/448): the reference kernels multiply amax by this constant, they do not divide.
_INV_E4M3_MAX = torch.tensor(1.0 / 448.0, dtype=torch.float32).item()
_MANTISSA_MASK = 0x7FFFFF
# Values of float32 bits at or above this (with the sign cleared) are Inf or NaN.
_F32_INF_BITS = 0x7F800000


class ScaleRule(str, enum.Enum):
    """How a block's E8M0 exponent is chosen from its amax.

    RCEIL: NVIDIA/TransformerEngine/FlashInfer/SGLang rule, amax/448 rounded UP to a power of two.
           The block maximum is never clipped. This is the default everywhere.
    FLOOR: OCP MX spec v1.0, floor(log2(amax)) - 8. Clips block maxima above 1.75 * 2^k; only on request.
    """

    RCEIL = "rceil"
    FLOOR = "floor"


class ScaleZeroBlocks(str, enum.Enum):
    """What the value bytes of a block whose scale byte is 0 (scale 2^-127: amax <= 448 * 2^-127,
    or amax 0) are.

    EXACT: x * 2^127 rounded to e4m3, the exact quotient like every other block. TransformerEngine
           v2.13 and later (its `exp2f_rcp` returns 2^127 for byte 0 since PR #2647, commit
           71971e33d, Feb 2026) and torchao after 0.18. The default.
    FLUSH: x * 1 rounded to e4m3, which is a signed zero (0x80 where x's sign bit is set, else
           0x00; NaN stays NaN): TransformerEngine v2.12 and earlier (`exp2f_rcp(0) == 1`) and
           torchao 0.18.0's RCEIL `to_mx`. Scale bytes are the same under both.
    """

    EXACT = "exact"
    FLUSH = "flush"


def _f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def block_amax(x: torch.Tensor, block: int = MX_BLOCK) -> torch.Tensor:
    """Float32 amax of |x| over blocks of `block` consecutive elements of the last axis.

    NaN propagates (torch.amax returns NaN for a block with NaN); callers check finiteness.
    """
    k = x.shape[-1]
    blocks = x.reshape(*x.shape[:-1], k // block, block)
    return blocks.abs().amax(dim=-1).to(torch.float32)


def rceil_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponent (int32) of amax * fl32(1/448) rounded up to a power of two.

    Mirrors the hardware cvt.rp.satfinite.ue8m0 rule: a non-zero mantissa bumps the exponent,
    except that saturates at 254, and a subnormal d <= 2^-127 stays at exponent 0 (2^-127).
    """
    d = amax.to(torch.float32) * _INV_E4M3_MAX
    bits = _f32_bits(d)
    exp = (bits >> 23) & 0xFF
    mant = bits & _MANTISSA_MASK
    bump = (mant != 0) & (exp != 254) & ~((exp == 0) & (mant <= 0x400000))
    return exp + bump.to(torch.int32)


def floor_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponent of 2^(floor(log2 amax) - 8), clamped to [0, 254]; zero amax -> 0."""
    a = amax.to(torch.float32)
    bits = _f32_bits(a)
    exp = (bits >> 23) & 0xFF
    # frexp handles float32 subnormals: a = m * 2^k with m in [0.5, 1) -> floor(log2 a) = k - 1.
    _, k = torch.frexp(a)
    floor_log2 = torch.where(exp > 0, exp - 127, k.to(torch.int32) - 1)
    biased = (floor_log2 - 8 + 127).clamp(0, 254)
    return torch.where(a > 0, biased, torch.zeros_like(biased))


def _pow2_from_biased(e: torch.Tensor) -> torch.Tensor:
    """float32 2^(127 - e) for biased exponents e in [0, 253], built from bits (exact)."""
    return ((254 - e).to(torch.int32) << 23).view(torch.float32)


def quantize_mxfp8(
    x: torch.Tensor,
    rule: ScaleRule | str = ScaleRule.RCEIL,
    *,
    allow_nonfinite: bool = False,
    name: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale_zero: ScaleZeroBlocks | str = ScaleZeroBlocks.EXACT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] to MXFP8: (data float8_e4m3fn [..., K], scale uint8 [..., K/32]).
    `scale_zero`: the values of blocks with scale byte 0 (see ScaleZeroBlocks).

    `out`: optional buffers of those shapes the result may be written into (a hint, to reuse
    memory; the returned tensors are the result either way).

    Non-finite inputs raise NumericsError naming the tensor and the first bad block, unless
    allow_nonfinite: then NaN stays NaN, +-Inf saturate to +-448 and the block scale comes from
    the finite values of the block.
    """
    rule = ScaleRule(rule)
    if x.shape[-1] % MX_BLOCK:
        raise NumericsError(f"last dimension {x.shape[-1]} is not a multiple of {MX_BLOCK}", tensor=name)
    xf = x.to(torch.float32)
    amax = block_amax(xf)
    if not torch.isfinite(amax).all():
        if not allow_nonfinite:
            bad = (~torch.isfinite(amax)).nonzero()[0].tolist()
            raise NumericsError(
                f"non-finite value (NaN/Inf) in block {tuple(bad)} (32 elements along K); "
                "use --allow-nonfinite to saturate Inf and keep NaN",
                tensor=name,
            )
        bad_blocks = int((~torch.isfinite(amax)).sum())
        warnings.warn(NonFiniteWarning(f"tensor {name or '?'}: {bad_blocks} block(s) hold NaN/Inf; quantized "
                                       "anyway (--allow-nonfinite): Inf saturated to +-448, NaN kept"), stacklevel=2)
        finite = torch.where(torch.isfinite(xf), xf, torch.zeros_like(xf))
        amax = block_amax(finite)
    exp = rceil_exponent(amax) if rule is ScaleRule.RCEIL else floor_exponent(amax)
    exp = exp.clamp(max=253)  # finite bf16/fp16/fp32 inputs never exceed 247
    inv_scale = _pow2_from_biased(exp).repeat_interleave(MX_BLOCK, dim=-1)
    scaled = (xf * inv_scale).clamp(-E4M3_MAX, E4M3_MAX)  # clamp keeps NaN; Inf -> +-448
    q, s = scaled.to(torch.float8_e4m3fn), exp.to(torch.uint8)
    if ScaleZeroBlocks(scale_zero) is ScaleZeroBlocks.FLUSH:
        q = flush_scale_zero_blocks(q, s, torch.signbit(xf), torch.isinf(xf))
    return q, s


def flush_scale_zero_blocks(q: torch.Tensor, scale: torch.Tensor, negative: torch.Tensor,
                            keep: torch.Tensor | None = None) -> torch.Tensor:
    """ScaleZeroBlocks.FLUSH applied to MXFP8 data q [..., K] (e4m3) with scale bytes [..., K/32]:
    every value of a block whose scale byte is 0 becomes 0x80 where `negative` (bool [..., K],
    the input's sign bit) else 0x00, except NaN codes and where `keep` (bool [..., K], e.g.
    the input was +-Inf and saturated) is set. A new tensor; q is not changed."""
    codes = q.view(torch.uint8)
    hit = (scale == 0).repeat_interleave(MX_BLOCK, dim=-1) & ((codes & 0x7F) != 0x7F)
    if keep is not None:
        hit &= ~keep
    signed_zero = negative.to(torch.uint8) << 7
    return torch.where(hit, signed_zero, codes).view(torch.float8_e4m3fn)


def dequantize_mxfp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data * 2^(scale - 127) per 1x32 block, computed in float32 (exact), returned as dtype."""
    if scale.dtype != torch.uint8:
        raise NumericsError(f"MXFP8 scale must be uint8, got {scale.dtype}")
    out = data.to(torch.float32) * e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)
    return out.to(dtype)


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 2^(byte - 127). Byte 255 (NaN in E8M0) is never produced here."""
    e = exponents.view(torch.uint8).to(torch.int32)
    s = (e << 23).view(torch.float32)
    # byte 0 is 2^-127, a float32 subnormal that the shift above cannot build
    return torch.where(e == 0, torch.full_like(s, 2.0**-127), s)


def _expand_tiles(scale: torch.Tensor, n: int, k: int, tile: int = FP8_TILE) -> torch.Tensor:
    return scale.repeat_interleave(tile, dim=0)[:n].repeat_interleave(tile, dim=1)[:, :k]


def fp8_block_scale_shape(shape: tuple[int, ...], tile: int = FP8_TILE) -> tuple[int, int]:
    n, k = shape
    return (-(-n // tile), -(-k // tile))


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """DeepSeek's weight_dequant: fp8 [N, K] * scale_inv of its 128x128 tile in float32, rounded to bf16.

    scale_inv may be float32 or E8M0 exponent bytes (uint8 / float8_e8m0fnu). `out`: an optional
    BF16 [N, K] buffer the result may be written into.
    """
    n, k = weight.shape
    prod = weight.to(torch.float32) * _expand_tiles(tile_scales_f32(scale_inv), n, k)
    return prod.to(torch.bfloat16)


def tile_scales_f32(scale_inv: torch.Tensor) -> torch.Tensor:
    """The float32 tile scales an FP8 weight is multiplied by: float32 as stored, UE8M0 exponent
    bytes (uint8 / float8_e8m0fnu) as 2^(e - 127)."""
    return scale_inv if scale_inv.dtype == torch.float32 else e8m0_to_float(ue8m0_exponents(scale_inv))


def requantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, rule: ScaleRule | str = ScaleRule.RCEIL,
                         *, allow_nonfinite: bool = False, name: str | None = None,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None,
                         scale_zero: ScaleZeroBlocks | str = ScaleZeroBlocks.EXACT) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_mxfp8(dequantize_fp8_block(weight, scale_inv)): DeepSeek's BF16 value, quantized
    (under FLUSH, a value's sign is that BF16 value's: the FP8 code's sign times the scale's).
    `out` as for quantize_mxfp8."""
    return quantize_mxfp8(dequantize_fp8_block(weight, scale_inv), rule, allow_nonfinite=allow_nonfinite, name=name,
                          scale_zero=scale_zero)


def ue8m0_exponents(scale: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Biased exponents (uint8) of a UE8M0 block scale stored as float32 powers of two or as bytes.

    Raises NumericsError when a float32 scale is not an exact positive power of two.
    """
    if scale.dtype == torch.uint8:
        return scale
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        return scale.view(torch.uint8)
    if scale.dtype != torch.float32:
        raise NumericsError(f"UE8M0 scale must be float32 or uint8, got {scale.dtype}", tensor=name)
    bits = _f32_bits(scale)
    exp = (bits >> 23) & 0xFF
    mant = bits & _MANTISSA_MASK
    normal_pow2 = (bits > 0) & (bits < _F32_INF_BITS) & (mant == 0)
    tiny = bits == 0x00400000  # 2^-127, the one subnormal power of two E8M0 can hold
    if not (normal_pow2 | tiny).all():
        bad = (~(normal_pow2 | tiny)).nonzero()[0].tolist()
        value = scale[tuple(bad)].item()
        raise NumericsError(f"scale {value!r} at tile {tuple(bad)} is not a power of two (scale_fmt ue8m0)",
                            tensor=name)
    return torch.where(tiny, torch.zeros_like(exp), exp).to(torch.uint8)


def relayout_ue8m0(weight: torch.Tensor, scale: torch.Tensor, name: str | None = None, *,
                   allow_nonfinite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless FP8 (128x128 power-of-two scales) -> MXFP8: keep the e4m3 bytes, give every
    1x32 block the exponent of the 128x128 tile it lies in. NaN bytes (e4m3 has no Inf) are an
    error, as in `quantize_mxfp8`, unless allow_nonfinite (then they stay NaN)."""
    n, k = weight.shape
    if k % MX_BLOCK:
        raise NumericsError(f"K={k} is not a multiple of {MX_BLOCK}", tensor=name)
    nan = (weight.view(torch.uint8) & 0x7F) == 0x7F
    if nan.any():
        if not allow_nonfinite:
            r, c = nan.nonzero()[0].tolist()
            raise NumericsError(f"NaN in block {(r, c // MX_BLOCK)} (32 elements along K); "
                                "use --allow-nonfinite to keep NaN", tensor=name)
        warnings.warn(NonFiniteWarning(f"tensor {name or '?'}: {int(nan.sum())} NaN value(s); kept as NaN "
                                       "(--allow-nonfinite)"), stacklevel=2)
    exps = ue8m0_exponents(scale, name)
    per_block = FP8_TILE // MX_BLOCK
    mx_scale = exps.repeat_interleave(FP8_TILE, dim=0)[:n].repeat_interleave(per_block, dim=1)[:, : k // MX_BLOCK]
    return weight, mx_scale.contiguous()
