"""The MXFP8 quantizer on named edge cases with hand-derived expected bytes, and against the
independent reference of tests/reference.py on random data."""

import pytest
import torch
from reference import reference_mxfp8

from converter.errors import NumericsError
from converter.numerics.dispatch import dequantize_mxfp8, quantize_mxfp8

# name: (first values of a 32-element block, rest zero), rule, expected scale byte, expected codes
# Derivations: byte e means scale 2^(e-127); codes are e4m3 bit patterns (sign|eeee|mmm, bias 7).
EDGE_CASES = {
    # amax 0: exponent byte 0 and all-zero codes, -0.0 keeps its sign bit
    "zero_block": ([0.0, -0.0], "rceil", 0, [0x00, 0x80]),
    # amax = 448 * 2^0: 448 * fl32(1/448) rounds to exactly 1.0 -> 2^0, no bump; 448 -> 0x7E, 1 -> 0x38
    "amax_448": ([448.0, 1.0, -448.0], "rceil", 127, [0x7E, 0x38, 0xFE]),
    # amax = 448 * 2^3: same with k = 3
    "amax_448_times_8": ([3584.0, -8.0], "rceil", 130, [0x7E, 0xB8]),
    # amax = 1.75 * 2^0 = 448 * 2^-8: d = 2^-8 exactly; 1.75 * 2^8 = 448; -1 -> -256 (0xF8); 0.5 -> 128 (0x70)
    "amax_1p75": ([1.75, -1.0, 0.5], "rceil", 119, [0x7E, 0xF8, 0x70]),
    # the OCP FLOOR rule agrees when amax mantissa <= 1.75
    "amax_1p75_floor": ([1.75, -1.0, 0.5], "floor", 119, [0x7E, 0xF8, 0x70]),
    # amax 1.9: RCEIL rounds d up to 2^-7 (1.9 * 2^7 = 243.2 -> 240 = 0x77); FLOOR keeps 2^-8 and clips 486.4 to 448
    "amax_1p9_rceil": ([1.9, 1.0], "rceil", 120, [0x77, 0x70]),
    "amax_1p9_floor_saturates": ([1.9, 1.0], "floor", 119, [0x7E, 0x78]),
    # subnormal inputs: d <= 2^-127 keeps exponent byte 0 (scale 2^-127); 2^-130 * 2^127 = 0.125 -> 0x20,
    # -2^-133 -> -2^-6 -> 0x88, 2^-127 -> 1.0 -> 0x38
    "subnormal_inputs": ([2.0**-130, -(2.0**-133), 2.0**-127], "rceil", 0, [0x20, 0x88, 0x38]),
    # ties to even: scale 2^-8 from amax 1.1875; 1.0625 * 256 = 272 halfway 256|288 -> 256 (0x78);
    # 1.1875 * 256 = 304 halfway 288|320 -> 320 (0x7A)
    "ties_to_even": ([1.0, 1.0625, 1.1875], "rceil", 119, [0x78, 0x78, 0x7A]),
    # largest bf16 (~2^128): byte 247; 1.9921875 * 2^7 = 255 -> 256 (0x78); -1 * 2^-120 underflows to -0
    "bf16_max": ([3.3895313892515355e38, -1.0], "rceil", 247, [0x78, 0x80]),
    # mixed signs: amax 2 -> d = 2^-7.8 rounds up to 2^-7; -2 * 2^7 = -256 (0xF8), 0.25 * 2^7 = 32 (0x60)
    "mixed_signs": ([-2.0, 2.0, -0.25, 0.25], "rceil", 120, [0xF8, 0x78, 0xE0, 0x60]),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_case_bytes(case):
    values, rule, scale_byte, codes = EDGE_CASES[case]
    x = torch.tensor(values + [0.0] * (32 - len(values)), dtype=torch.bfloat16)[None]
    q, s = quantize_mxfp8(x, rule)
    assert s.dtype == torch.uint8 and q.dtype == torch.float8_e4m3fn
    assert s.tolist() == [[scale_byte]]
    assert q.view(torch.uint8)[0, : len(codes)].tolist() == codes
    assert q.view(torch.uint8)[0, len(codes):].eq(0).all()
    ref_q, ref_s = reference_mxfp8(x, rule)
    assert torch.equal(ref_q, q.view(torch.uint8)) and torch.equal(ref_s, s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_an_error_naming_the_tensor_and_block(bad):
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[1, 40] = bad
    with pytest.raises(NumericsError) as err:
        quantize_mxfp8(x, name="model.layers.7.mlp.down_proj.weight")
    assert "model.layers.7.mlp.down_proj.weight" in str(err.value)
    assert "(1, 1)" in str(err.value)


def test_allow_nonfinite_saturates_inf_and_keeps_nan():
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 2.0])
    q, s = quantize_mxfp8(x, allow_nonfinite=True)
    assert s.tolist() == [[120]]  # from the finite amax 2.0
    codes = q.view(torch.uint8)[0, :4].tolist()
    assert codes[:2] + codes[3:] == [0x7E, 0xFE, 0x78]
    assert codes[2] & 0x7F == 0x7F  # e4m3fn NaN (either sign)


@pytest.mark.parametrize("rule", ["rceil", "floor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_matches_reference(rule, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=gen) * torch.logspace(-6, 3, 64)[:, None]
    x = x.to(dtype)
    q, s = quantize_mxfp8(x, rule)
    ref_q, ref_s = reference_mxfp8(x, rule)
    assert torch.equal(q.view(torch.uint8), ref_q)
    assert torch.equal(s, ref_s)


def test_rceil_and_floor_differ_on_real_looking_weights():
    """The two rules must not silently coincide: FLOOR picks a smaller scale on a sizeable share of blocks."""
    x = (torch.randn(256, 1024, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    _, s_rceil = quantize_mxfp8(x, "rceil")
    _, s_floor = quantize_mxfp8(x, "floor")
    differ = (s_rceil != s_floor).float().mean().item()
    assert 0.05 < differ < 0.5


def test_gaussian_round_trip_error_is_as_expected():
    x = torch.randn(512, 2048, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, s = quantize_mxfp8(x)
    back = dequantize_mxfp8(q, s)
    rel_mse = ((back - x.float()) ** 2).mean() / (x.float() ** 2).mean()
    assert 5e-4 < rel_mse.item() < 9e-4  # SPEC: about 7e-4 (SQNR about 31 dB)


def test_k_not_multiple_of_32_is_an_error():
    with pytest.raises(NumericsError, match="multiple of 32"):
        quantize_mxfp8(torch.ones(2, 48), name="w")
