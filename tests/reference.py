"""Straightforward reference implementations, written independently of converter.numerics.reference:
Python floats, math.frexp and an explicit table of every e4m3 value. Slow; for tiny tensors."""

from __future__ import annotations

import numpy as np
import torch

INV_448_F32 = np.float32(1.0) / np.float32(448.0)


def _e4m3_table() -> tuple[list[float], list[int]]:
    values, codes = [], []
    for code in range(0x7F):  # 0x7F is NaN
        exp, man = (code >> 3) & 0xF, code & 7
        v = man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        values.append(v)
        codes.append(code)
    return values, codes


E4M3_VALUES, E4M3_CODES = _e4m3_table()


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """Round already-scaled float64 values to e4m3 codes: nearest value, ties to the even code,
    saturating at 448; the sign bit is kept for -0.0 and for values that round to zero."""
    values = np.array(E4M3_VALUES)
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(values, a, side="left"), 0, len(values) - 1)
    lo = np.clip(hi - 1, 0, len(values) - 1)
    dlo, dhi = a - values[lo], values[hi] - a
    tie_pick = np.where(lo % 2 == 0, lo, hi)  # codes equal indices here: even code = even mantissa
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, tie_pick))
    pick = np.where(values[hi] == a, hi, pick)
    sign = np.where(np.signbit(x), 0x80, 0)
    return (pick | sign).astype(np.uint8)


def scale_bytes(amax: np.ndarray, rule: str) -> np.ndarray:
    """E8M0 bytes per block from float64 block amax (exact for bf16/fp16/fp32 inputs)."""
    if rule == "rceil":
        d = amax.astype(np.float32) * INV_448_F32  # float32 multiply, as the reference kernels do
        m, k = np.frexp(d.astype(np.float64))  # d = m * 2^k, m in [0.5, 1)
        log2 = np.where(m == 0.5, k - 1, k)  # ceil(log2 d)
    else:
        m, k = np.frexp(amax)
        log2 = (k - 1) - 8  # floor(log2 amax) - 8
    return np.where(amax == 0, 0, np.clip(log2 + 127, 0, 254)).astype(np.uint8)


def reference_mxfp8(x: torch.Tensor, rule: str = "rceil", scale_zero: str = "exact"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 e4m3 codes [..., K], uint8 scale bytes [..., K/32]). Values are multiplied by
    2^(127 - byte), except, with scale_zero "flush" (TransformerEngine <= 2.12), by 1 where the
    byte is 0."""
    v = x.to(torch.float64).numpy()
    blocks = v.reshape(*v.shape[:-1], v.shape[-1] // 32, 32)
    s = scale_bytes(np.abs(blocks).max(axis=-1), rule)
    multiplier = np.exp2(127.0 - s.astype(np.float64))
    if scale_zero == "flush":
        multiplier = np.where(s == 0, 1.0, multiplier)
    scaled = blocks * multiplier[..., None]
    return torch.from_numpy(e4m3_codes(scaled).reshape(v.shape)), torch.from_numpy(s)


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 codes -> float64 values (independent of torch's float8 support)."""
    table = torch.tensor(E4M3_VALUES + [float("nan")], dtype=torch.float64)
    mag = table[(codes & 0x7F).long()]
    return torch.where((codes & 0x80) != 0, -mag, mag)


def reference_fp8_dequant(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """DeepSeek's dequantization, tile by tile: float32 product rounded to bf16."""
    n, k = weight.shape
    vals = e4m3_decode(weight.view(torch.uint8)).to(torch.float32)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rs, cs = slice(i * 128, min(n, (i + 1) * 128)), slice(j * 128, min(k, (j + 1) * 128))
            out[rs, cs] = (vals[rs, cs] * scale_inv[i, j].to(torch.float32)).to(torch.bfloat16)
    return out
