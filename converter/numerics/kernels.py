"""Fast paths for the conversion's hot loops, byte-identical to the reference functions in
`converter.numerics.reference` (the specification; `dispatch` falls back to it where these decline).

On CPU the compiled kernels of `converter.numerics.native` run when they could be built (one pass per
block; an FP8 source costs a table lookup per element; with AVX-512, about 4.7 G elements/s per
core from FP8 and 3 G/s from BF16 on a 2-core AMD EPYC VM, 7x and 3x the torch code; built for
AVX2 only, 2.6 G/s from FP8 and 2.2 G/s from BF16 there). The torch code here is what runs on GPUs, and on CPUs without a C
compiler.

What makes them fast (profiled on a 2-core Xeon VM; the reference path runs at about 60 M
elements/s there, these at 300-450 M/s per core):
- Rows are processed in chunks of about 1M elements, so the temporaries stay in cache; the
  reference path streams whole-tensor float32 copies through memory 6-8 times.
- No repeat_interleave of scales: a broadcasting view multiplies each 1x32 block. Temporaries
  are per-thread buffers reused across calls (fresh memory costs a page fault per 4 KB).
- Block amax on integer bits: |x| is `bits & 0x7FFFFFFF` of the float32 value, integer order is
  float order, and NaN/Inf come out on top (>= 0x7F80 as BF16 bits) where the tables flag them.
- The E8M0 exponent and the power-of-two multiplier of a block come from 32768-entry tables
  indexed by the amax's BF16 bits, built from `numerics.rceil_exponent`/`floor_exponent`: no
  log2/exp2, no per-block float arithmetic, no repeat_interleave of the scale.
- FP8 sources: torch's float8 -> float conversion is scalar and slow; an e4m3 byte shifted left
  by 7 is instead the IEEE half whose value is the e4m3 value times 2^-8 (subnormals included),
  and half -> float32 is a hardware conversion. The 2^8 goes into the tile scale.
- FP8 sources, requantized: DeepSeek's BF16 value is bf16(fl32(v * s)) and the MXFP8 byte is
  e4m3(that * 2^j). When every product stays a normal float (checked: 2^-117 <= |s| <= 2^100),
  rounding commutes with the power of two, so one multiply by s * 2^j per block does both and
  the BF16 tensor never exists; the block's 2^j comes from the e4m3 codes' amax alone.

Every function returns None when its input has something the fast path does not model (NaN or
Inf, scales outside that range): the caller then runs the reference path, which raises or warns.
"""

from __future__ import annotations

import ctypes

import threading

import torch

from converter.numerics import native
from converter.numerics.reference import ScaleRule, e8m0_to_float, floor_exponent, rceil_exponent

# Elements per row chunk on CPU. Smaller chunks fit L2 better, but each chunk costs ~15 torch
# calls of Python and GIL hand-over between workers; 1M (about 12 MB of temporaries, in L3)
# measured fastest end to end with 2 workers on 2 cores (128K: about 25% slower).
CPU_CHUNK_ELEMS = 1 << 20
# On an accelerator no cache is to be fitted; chunks only bound the temporaries' memory.
DEVICE_CHUNK_ELEMS = 1 << 26
_BLOCK = 32
_TILE = 128
_NONFINITE = 255  # exponent-table sentinel for NaN/Inf amax: never a valid byte here
_F32_ABS_MASK = 0x7FFFFFFF
_FP8_NAN_AS_F32_BITS = 0x3FF00000  # e4m3 NaN (0x7F) through the half trick: 1.875
_MIN_TILE_SCALE, _MAX_TILE_SCALE = 2.0**-117, 2.0**100
_F32_SAFE = 2.0**127  # any finite bound above every real multiplier; only all-zero blocks reach it

Out = tuple[torch.Tensor, torch.Tensor] | None  # optional output buffers (data, scale)

_tables: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()


def _cached(key: tuple, build) -> torch.Tensor:
    with _tables_lock:
        if key not in _tables:
            _tables[key] = build()
        return _tables[key]


def scale_tables(rule: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier float32[32768], exponent uint8[32768]) indexed by the BF16 bits of a block's |amax|:
    multiplier 2^(127 - e) and byte e, or 0 and 255 where the bits are Inf/NaN.
    Cached by everything they depend on: the rule and the device."""

    def build() -> torch.Tensor:
        bits = torch.arange(0x8000, dtype=torch.int32)
        amax = (bits << 16).view(torch.float32)
        exp = rceil_exponent(amax) if ScaleRule(rule) is ScaleRule.RCEIL else floor_exponent(amax)
        exp = exp.clamp(max=253)  # as numerics.quantize_mxfp8
        finite = bits < 0x7F80
        mult = torch.where(finite, (254 - exp) << 23, torch.zeros_like(exp)).view(torch.float32)
        exp_bytes = torch.where(finite, exp, torch.full_like(exp, _NONFINITE)).to(torch.uint8)
        return torch.stack([mult.view(torch.int32), exp_bytes.to(torch.int32)]).to(device)

    both = _cached(("scales", rule, str(device)), build)
    return both[0].view(torch.float32), both[1].to(torch.uint8)


_workspace = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread temporary reused across calls: fresh memory for every tensor cost a page fault
    per 4 KB, about as much as the arithmetic. Never returned to callers."""
    nbytes = max(1, torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size())
    cache = getattr(_workspace, "bufs", None)
    if cache is None:
        cache = _workspace.bufs = {}
    key = (slot, str(device))
    buf = cache.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = cache[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf[:nbytes].view(dtype).view(shape)


def _native(device: torch.device):
    """The compiled kernels for CPU tensors (converter.numerics.native), or None: then the torch code below."""
    if device.type != "cpu":
        return None
    return native.load()


def _chunk_rows(k: int, device: torch.device, limit: int | None = None) -> int:
    rows = max(1, (CPU_CHUNK_ELEMS if device.type == "cpu" else DEVICE_CHUNK_ELEMS) // k)
    if limit is not None:  # a power of two, so chunks tile the 128-row FP8 bands exactly
        rows = min(limit, 1 << (rows.bit_length() - 1))
    return rows


def _outputs(out: Out, n: int, k: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [n, k], uint8 [n, k/32]) views of the caller's buffers, or fresh ones."""
    if out is not None:
        q, s = out
        if (q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8 and q.numel() == n * k
                and s.numel() == n * (k // _BLOCK) and q.is_contiguous() and s.is_contiguous()
                and q.device == dev and s.device == dev):
            return q.view(n, k), s.view(n, k // _BLOCK)
    return (torch.empty((n, k), dtype=torch.float8_e4m3fn, device=dev),
            torch.empty((n, k // _BLOCK), dtype=torch.uint8, device=dev))


def quantize_bf16(x: torch.Tensor, rule: str, out: Out = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """numerics.quantize_mxfp8 for BF16 x [..., K]; None if any value is NaN/Inf. `out`: optional
    (float8 data, uint8 scale) buffers of the result's sizes to write into (spares fresh memory)."""
    k = x.shape[-1]
    nb = k // _BLOCK
    x2 = x.reshape(-1, k)
    n, dev = x2.shape[0], x2.device
    mult_table, exp_table = scale_tables(rule, dev)
    clamp = rule != "rceil"  # RCEIL never scales a finite BF16 block past 448 (see SPEC section 3)
    q, scales = _outputs(out, n, k, dev)
    lib = _native(dev)
    if lib is not None:
        x2 = x2.contiguous()
        status = lib.mx_quantize_bf16(x2.data_ptr(), n, k, mult_table.data_ptr(), exp_table.data_ptr(),
                                      int(clamp), q.data_ptr(), scales.data_ptr())
        return None if status else (q.view(x.shape), scales.view(*x.shape[:-1], nb))
    amax = _scratch("amax", (n, nb), torch.int32, dev)
    rows = min(n, _chunk_rows(k, dev))
    f = _scratch("f", (rows, k), torch.float32, dev)
    scratch = _scratch("i", (rows, k), torch.int32, dev)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        fm, sm, a = f[:m], scratch[:m], amax[r0:r0 + m]
        fm.copy_(x2[r0:r0 + m])
        torch.bitwise_and(fm.view(torch.int32), _F32_ABS_MASK, out=sm)
        torch.amax(sm.view(m, nb, _BLOCK), dim=-1, out=a)
        torch.bitwise_right_shift(a, 16, out=a)  # float32 bits of a BF16 value -> its BF16 bits
        mult = torch.index_select(mult_table, 0, a.view(-1))
        fm.view(m, nb, _BLOCK).mul_(mult.view(m, nb, 1))  # exact: a power of two
        if clamp:  # FLOOR may scale a block maximum past 448: saturate as the reference does
            fm.clamp_(-448.0, 448.0)
        q[r0:r0 + m].copy_(fm)  # torch's own float -> e4m3 rounding, as the reference
    torch.index_select(exp_table, 0, amax.view(-1), out=scales.view(-1))
    if bool((scales == _NONFINITE).any()):
        return None
    return q.view(x.shape), scales.view(*x.shape[:-1], nb)


def _block_scales(scale_inv: torch.Tensor, k: int, fused: bool) -> torch.Tensor | None:
    """float32 [bands, K/32]: each 1x32 block's 128x128 tile scale times 2^8 (for the half
    trick), or None when a scale is outside the range the fast path is exact for."""
    if scale_inv.dtype != torch.float32 or k % _BLOCK:
        return None
    s = scale_inv.abs()
    low = _MIN_TILE_SCALE if fused else 0.0
    if not bool(((s >= low) & (s <= _MAX_TILE_SCALE)).all()):  # also rejects NaN
        return None
    return (scale_inv * 256.0).repeat_interleave(_TILE // _BLOCK, dim=1)[:, : k // _BLOCK].contiguous()


def _fp8_to_f32(src_i8: torch.Tensor, half: torch.Tensor, f: torch.Tensor) -> None:
    """e4m3 bytes -> float32 value * 2^-8, through the IEEE half with bits (sign, eeee mmm << 7)."""
    half.copy_(src_i8)  # sign-extends: negative codes also set bits 14..8
    torch.bitwise_left_shift(half, 7, out=half)
    torch.bitwise_and(half, -16385, out=half)  # 0xBFFF: drop bit 14, keep the sign in bit 15
    f.copy_(half.view(torch.float16))


def dequantize_mxfp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """numerics.dequantize_mxfp8 in float32 for e4m3 data [..., K] and uint8 scales [..., K/32],
    decoded by the half trick instead of torch's scalar float8 cast (about 3x faster on CPU);
    None when a NaN code is present (the trick would read it as 1.875)."""
    if bool(((data.view(torch.uint8) & 0x7F) == 0x7F).any()):
        return None
    half = torch.empty(data.shape, dtype=torch.int16, device=data.device)
    out = torch.empty(data.shape, dtype=torch.float32, device=data.device)
    _fp8_to_f32(data.view(torch.int8), half, out)  # value * 2^-8, exact

    # 2^(e - 127) then 2^8, each exact: a product too small for a normal float32 still has its
    # 4 significant bits above 2^-149, and one too large is Inf either way
    out.view(*data.shape[:-1], -1, _BLOCK).mul_(e8m0_to_float(scale).unsqueeze(-1)).mul_(256.0)
    return out


def _bands(n: int, rows: int):
    """Row chunks that never straddle a 128-row tile band: (band, first row, rows)."""
    for band in range(-(-n // _TILE)):
        end = min(n, (band + 1) * _TILE)
        for r0 in range(band * _TILE, end, rows):
            yield band, r0, min(rows, end - r0)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """numerics.dequantize_fp8_block for float32 scales; None on NaN codes or non-finite scales
    and, in the torch code, scales it cannot handle exactly."""
    n, k = weight.shape
    dev, lib = weight.device, _native(weight.device)
    if out is None or out.dtype != torch.bfloat16 or out.numel() != n * k or not out.is_contiguous() \
            or out.device != dev:
        out = torch.empty((n, k), dtype=torch.bfloat16, device=dev)
    out = out.view(n, k)
    if lib is not None:
        if (scale_inv.dtype != torch.float32 or weight.element_size() != 1 or scale_inv.dim() != 2
                or scale_inv.shape[0] < -(-n // _TILE) or scale_inv.shape[1] < -(-k // _TILE)):
            return None  # the reference path says what is wrong
        w, s = weight.contiguous(), scale_inv.contiguous()
        return None if lib.mx_dequantize_fp8(w.data_ptr(), n, k, s.data_ptr(), s.shape[1], out.data_ptr()) else out
    sblk = _block_scales(scale_inv, k, fused=False)
    if sblk is None or bool(((weight.view(torch.uint8) & 0x7F) == 0x7F).any()):
        return None
    nb = k // _BLOCK
    rows = min(n, _chunk_rows(k, dev, _TILE))
    half = _scratch("h", (rows, k), torch.int16, dev)
    f = _scratch("f", (rows, k), torch.float32, dev)
    wi = weight.view(torch.int8)
    for band, r0, m in _bands(n, rows):
        _fp8_to_f32(wi[r0:r0 + m], half[:m], f[:m])
        f[:m].view(m, nb, _BLOCK).mul_(sblk[band].view(1, nb, 1))  # the same single rounding as v * s
        out[r0:r0 + m].copy_(f[:m])  # DeepSeek's round to BF16
    return out


def fp8_tiles_fit(weight: torch.Tensor, scale_inv: torch.Tensor) -> bool:
    """Whether the compiled FP8 kernels take these: one-byte codes [N, K] with K a multiple of 32,
    and float32 tile scales covering every 128x128 tile."""
    n, k = weight.shape
    return (scale_inv.dtype == torch.float32 and not k % _BLOCK and weight.element_size() == 1
            and scale_inv.dim() == 2 and scale_inv.shape[0] >= -(-n // _TILE) and scale_inv.shape[1] >= -(-k // _TILE))


def requantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, rule: str, out: Out = None
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_mxfp8(dequantize_fp8_block(weight, scale_inv)) without the BF16 tensor in memory;
    None (the caller falls back) on NaN codes, non-finite scales, and, in the torch code, scales
    outside [2^-117, 2^100]."""
    n, k = weight.shape
    lib = _native(weight.device)
    if lib is not None:
        if not fp8_tiles_fit(weight, scale_inv):
            return None  # the reference path says what is wrong
        mult_table, exp_table = scale_tables(rule, weight.device)
        q, scales = _outputs(out, n, k, weight.device)
        w, s = weight.contiguous(), scale_inv.contiguous()
        status = lib.mx_requantize_fp8(w.data_ptr(), n, k, s.data_ptr(), s.shape[1], mult_table.data_ptr(),
                                       exp_table.data_ptr(), int(rule != "rceil"), q.data_ptr(), scales.data_ptr())
        return None if status else (q, scales)
    sblk = _block_scales(scale_inv, k, fused=True)
    if sblk is None:
        return None
    sblk_abs = sblk.abs()
    dev, nb = weight.device, k // _BLOCK
    mult_table, exp_table = scale_tables(rule, dev)
    clamp = rule != "rceil"  # RCEIL never scales a finite BF16 block past 448 (see SPEC section 3)
    q, scales = _outputs(out, n, k, dev)
    code_amax = _scratch("amax", (n, nb), torch.int32, dev)
    amax = _scratch("amax16", (n, nb), torch.bfloat16, dev)
    rows = min(n, _chunk_rows(k, dev, _TILE))
    half = _scratch("h", (rows, k), torch.int16, dev)
    f = _scratch("f", (rows, k), torch.float32, dev)
    scratch = _scratch("i", (rows, k), torch.int32, dev)
    wi = weight.view(torch.int8)
    for band, r0, m in _bands(n, rows):
        fm, sm, ca, a = f[:m], scratch[:m], code_amax[r0:r0 + m], amax[r0:r0 + m]
        _fp8_to_f32(wi[r0:r0 + m], half[:m], fm)
        torch.bitwise_and(fm.view(torch.int32), _F32_ABS_MASK, out=sm)
        torch.amax(sm.view(m, nb, _BLOCK), dim=-1, out=ca)
        # the block's BF16 amax is bf16(fl32(max|v| * |s|)): rounding is monotonic
        torch.mul(ca.view(torch.float32), sblk_abs[band], out=a)
        mult = torch.index_select(mult_table, 0, a.view(torch.int16).view(-1).int())
        combined = (mult.view(m, nb) * sblk[band]).clamp_(-_F32_SAFE, _F32_SAFE)
        fm.view(m, nb, _BLOCK).mul_(combined.view(m, nb, 1))
        hb = half[:m].view(torch.bfloat16)
        hb.copy_(fm)  # DeepSeek's round to BF16, already scaled by the block's power of two
        if clamp:
            hb.clamp_(-448.0, 448.0)
        q[r0:r0 + m].copy_(hb)
    if bool((code_amax == _FP8_NAN_AS_F32_BITS).any()):
        return None
    torch.index_select(exp_table, 0, amax.view(torch.int16).view(-1).int(), out=scales.view(-1))
    if bool((scales == _NONFINITE).any()):
        return None
    return q, scales


def error_stats_bf16(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, clip: float) -> tuple | None:
    """(sum x^2, sum err^2, max block |err|, max block |err| / amax, clipped, zero blocks, lost
    blocks, non-finite x) of MXFP8 (q, s) against BF16 x [N, K] in one compiled pass
    (`mx_stats.c`); None where there is no compiled kernel or the input is another kind."""
    lib = _native(x.device)
    n, k = x.shape if x.dim() == 2 else (0, 0)
    if (lib is None or x.dtype != torch.bfloat16 or x.dim() != 2 or k % _BLOCK or q.shape != x.shape
            or q.element_size() != 1 or s.dtype != torch.uint8 or s.numel() != n * (k // _BLOCK)
            or q.device != x.device or s.device != x.device):
        return None
    x, q, s = x.contiguous(), q.contiguous(), s.contiguous()
    sums, counts = (ctypes.c_double * 4)(), (ctypes.c_int64 * 4)()
    lib.mx_error_stats_bf16(x.data_ptr(), n, k, q.data_ptr(), s.data_ptr(), clip, sums, counts)
    return (*sums, *counts)
