"""mxconv against an independent MXFP8 quantizer: torchao 0.18's RCEIL `to_mx`, over every finite
BF16 value in several block arrangements (GitHub issue 19).

torchao 0.18.0 follows TransformerEngine <= 2.12 (`exp2f_rcp(0) == 1`: blocks with scale byte 0
become signed zeros): it must equal mxconv's `scale_zero_blocks: flush` byte for byte, and
mxconv's default (TE >= 2.13, x * 2^127) everywhere except, exactly, the blocks with scale byte
0 and a non-zero value. Skipped where torchao is not installed (it is in the `test` extra).
"""

from __future__ import annotations

import pytest
import torch

from converter.numerics.dispatch import quantize_mxfp8

pytest.importorskip("torchao")  # a test dependency: absent only outside the test extra
import torchao.prototype.mx_formats.config as config  # noqa: E402  (an API move must fail, not skip)
import torchao.prototype.mx_formats.mx_tensor as mx_tensor  # noqa: E402


def torchao_rceil(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value bytes [B, 32], scale bytes [B]) of torchao's RCEIL to_mx."""
    scale, data = mx_tensor.to_mx(x.contiguous(), torch.float8_e4m3fn, 32,
                                  scaling_mode=config.ScaleCalculationMode.RCEIL)
    return data.view(torch.uint8).reshape(-1, 32), scale.view(torch.uint8).reshape(-1)


def bf16(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.bfloat16)


def finite_bf16_bits() -> torch.Tensor:
    bits = torch.arange(65536, dtype=torch.int32)
    return bits[((bits >> 7) & 0xFF) != 0xFF]  # 65280 values, both zeros included


def layouts() -> dict[str, torch.Tensor]:
    bits = finite_bf16_bits()
    n = len(bits)
    values = bf16(bits)
    # A: each value alone in its block (at position i % 32), the rest +0
    alone = torch.zeros(n, 32, dtype=torch.bfloat16)
    alone[torch.arange(n), torch.arange(n) % 32] = values
    # B: each value the maximum of its block, with 31 smaller companions of both signs spanning
    # many binades (down to underflow)
    frac = torch.tensor([2.0 ** -k * (1 + (k % 7) / 8) for k in range(31)], dtype=torch.float64).clamp(max=1.0)
    sign = torch.tensor([1.0 if k % 2 == 0 else -1.0 for k in range(31)], dtype=torch.float64)
    comp = (values.double()[:, None] * frac * sign).to(torch.bfloat16)
    comp = torch.where(comp.float().abs() <= values.float().abs()[:, None], comp, values[:, None])
    is_max = torch.cat([values[:, None], comp], dim=1)
    # C: every value under fixed block maxima around scale byte 0 and far from it
    rows = []
    for m in [2.0**-133, 2.0**-130, 2.0**-127, 448 * 2.0**-128, 448 * 2.0**-127, 448 * 2.0**-127 * 1.01,
              2.0**-120, 2.0**-117, 2.0**-100, 1.0, 449.0, 3.3895313892515355e38]:
        top = torch.tensor([m], dtype=torch.bfloat16)
        sel = values[values.float().abs() <= top.float()]
        sel = torch.cat([sel, torch.zeros((-len(sel)) % 31, dtype=torch.bfloat16)]).reshape(-1, 31)
        rows.append(torch.cat([sel, top.expand(len(sel), 1)], dim=1))
    under = torch.cat(rows)
    return {"alone": alone, "value_is_max": is_max, "under_fixed_maxima": under}


@pytest.fixture(scope="module")
def cases():
    return {name: (x, *torchao_rceil(x)) for name, x in layouts().items()}


@pytest.mark.parametrize("name", ["alone", "value_is_max", "under_fixed_maxima"])
def test_flush_equals_torchao_0_18_on_every_finite_bf16_value(cases, name, backend):
    x, ao_q, ao_s = cases[name]
    q, s = quantize_mxfp8(x, "rceil", scale_zero="flush")
    assert s.dtype == ao_s.dtype == torch.uint8 and q.dtype == torch.float8_e4m3fn
    assert torch.equal(s.reshape(-1), ao_s)
    assert torch.equal(q.view(torch.uint8), ao_q)


@pytest.mark.parametrize("name", ["alone", "value_is_max", "under_fixed_maxima"])
def test_default_differs_from_torchao_0_18_exactly_in_the_nonzero_scale_zero_blocks(cases, name, backend):
    x, ao_q, ao_s = cases[name]
    q, s = quantize_mxfp8(x, "rceil")
    assert s.dtype == ao_s.dtype == torch.uint8
    assert torch.equal(s.reshape(-1), ao_s)  # identical scale bytes everywhere
    differ = (q.view(torch.uint8) != ao_q).any(dim=1)
    nonzero = (x.float() != 0).any(dim=1)
    expected = (ao_s == 0) & nonzero
    assert torch.equal(differ, expected)
    assert int(expected.sum()) > 100  # the comparison covers many such blocks
    if name == "alone":  # every non-zero BF16 value up to 448 * 2^-127 (0x0460), both signs
        assert int(expected.sum()) == 2 * 0x460
