"""The compiled kernels with their e4m3 bytes written to a file as they are made (`stream.c`), for
the executor: the same bytes as `dispatch.requantize_fp8_block` and `dispatch.quantize_mxfp8`,
without a buffer of the whole output in between.

Why: made into a buffer of the whole piece and written from there by a writer thread, every
output byte went to memory and was read back by write(2). Made a band of rows at a time into a
buffer that stays in the core's cache and written from there, it does not: on a 16-core VM whose
memory gave about 35-40 GB/s, that was 12.3 GB/s of FP8 input against 10.4
(docs/performance-log.md, "ninth session").

Each function returns True once every byte is written (the scales are in `scales`), False where
the kernels decline (no compiled library, a NaN or Inf, a scale they do not model, shapes they do
not take): then nothing usable was written and the caller converts the piece its usual way, whose
bytes land over whatever bands went out. A failed write raises OSError. Only ScaleZeroBlocks.EXACT
(the kernels' own rule): FLUSH rewrites blocks after the fact, which a written band cannot take.
"""

from __future__ import annotations

import os

import torch

from converter.numerics import kernels
from converter.numerics.dispatch import tile_scales
from converter.numerics.reference import MX_BLOCK, FP8_TILE, ScaleRule


def _status(status: int) -> bool:
    if status < 0:
        raise OSError(-status, os.strerror(-status))
    return status == 0


def _scales_fit(scales: torch.Tensor, n: int, k: int) -> bool:
    return (scales.dtype == torch.uint8 and scales.is_contiguous() and scales.numel() == n * (k // MX_BLOCK)
            and scales.device.type == "cpu")


def requantize_fp8_to_file(weight: torch.Tensor, scale_inv: torch.Tensor, rule: ScaleRule | str, fd: int,
                           offset: int, scales: torch.Tensor, band: torch.Tensor, lock: int | None = None) -> bool:
    """requantize_fp8_block(weight, scale_inv, rule): its e4m3 bytes written to `fd` at `offset`
    (row 0 there, rows one after another), 128-row multiples at a time through `band` (uint8,
    at least 128 rows' bytes), its scales into `scales`. `lock`: the address of a pthread mutex
    held around each write (the file's writers take turns on it asleep), or None."""
    lib = kernels._native(weight.device)  # (tests swap in each instruction-set build there)
    if lib is None or weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        return False
    n, k = weight.shape
    s = tile_scales(scale_inv)
    rows = band.numel() // max(1, k) // FP8_TILE * FP8_TILE
    if s is None or not n or rows == 0 or not _scales_fit(scales, n, k) or not kernels.fp8_tiles_fit(weight, s):
        return False
    rule = ScaleRule(rule).value
    mult, exp = kernels.scale_tables(rule, weight.device)
    w, s = weight.contiguous(), s.contiguous()
    return _status(lib.mx_requantize_fp8_to_fd(w.data_ptr(), n, k, s.data_ptr(), s.shape[1], mult.data_ptr(),
                                               exp.data_ptr(), int(rule != "rceil"), band.data_ptr(), rows, fd,
                                               offset, lock, scales.data_ptr()))


def quantize_bf16_to_file(x: torch.Tensor, rule: ScaleRule | str, fd: int, offset: int, scales: torch.Tensor,
                          band: torch.Tensor, lock: int | None = None) -> bool:
    """quantize_mxfp8(x, rule) of BF16 x [N, K]: its e4m3 bytes written to `fd` at `offset`, whole
    rows at a time through `band` (uint8, at least one row's bytes), its scales into `scales`;
    `lock` as requantize_fp8_to_file's."""
    lib = kernels._native(x.device)
    if lib is None or x.dim() != 2 or x.dtype != torch.bfloat16:
        return False
    n, k = x.shape
    rows = band.numel() // max(1, k)
    if not n or k % MX_BLOCK or rows == 0 or not _scales_fit(scales, n, k):
        return False
    rule = ScaleRule(rule).value
    mult, exp = kernels.scale_tables(rule, x.device)
    x = x.contiguous()
    return _status(lib.mx_quantize_bf16_to_fd(x.data_ptr(), n, k, mult.data_ptr(), exp.data_ptr(),
                                              int(rule != "rceil"), band.data_ptr(), rows, fd, offset, lock,
                                              scales.data_ptr()))
