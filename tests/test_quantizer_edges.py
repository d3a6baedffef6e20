"""The MXFP8 quantizer on named edge cases with hand-derived expected bytes, and against the
independent reference of tests/reference.py on random data."""

import pytest
import torch
from reference import reference_mxfp8

from converter.errors import NumericsError
from converter.numerics.dispatch import (
    dequantize_mxfp8,
    quantize_mxfp8,
    requantize_fp8_block,
)
from converter.numerics.reference import quantize_mxfp8 as reference_quantize_mxfp8
from converter.numerics.reference import (
    requantize_fp8_block as reference_requantize_fp8_block,
)

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


# Blocks with scale byte 0 (amax <= 448 * 2^-127, BF16 bits <= 0x0460; see SPEC section 3): one value
# x followed by 31 zeros. name: (BF16 bits of x, (scale, code) with scale_zero_blocks "exact" =
# TransformerEngine >= 2.13 = x * 2^127 rounded, (scale, code) with "flush" = TE <= 2.12 and
# torchao 0.18 = x * 1 rounded: a signed zero).
SCALE_ZERO_CASES = {
    # 2^-130 * 2^127 = 2^-3 = 0x20 | 2^-130 * 1 rounds to +0
    "two_to_minus_130": (0x0008, (0, 0x20), (0, 0x00)),
    "minus_two_to_minus_130": (0x8008, (0, 0xA0), (0, 0x80)),
    # the smallest BF16 subnormal 2^-133 -> 2^-6 = 0x08 | +0
    "min_subnormal": (0x0001, (0, 0x08), (0, 0x00)),
    "minus_min_subnormal": (0x8001, (0, 0x88), (0, 0x80)),
    # 448 * 2^-127 = 1.75 * 2^-119: d = 2^-127 exactly, still byte 0; x * 2^127 = 448 = 0x7E | +0
    "amax_448_times_2_to_minus_127": (0x0460, (0, 0x7E), (0, 0x00)),
    "minus_448_times_2_to_minus_127": (0x8460, (0, 0xFE), (0, 0x80)),
    # the next BF16 above, 1.7578125 * 2^-119: d > 2^-127 rounds up to 2^-126, byte 1 under both rules;
    # x * 2^126 = 225 -> 224 (0x76)
    "next_above": (0x0461, (1, 0x76), (1, 0x76)),
    # 2^-127 -> 1.0 = 0x38 | +0; 2^-120 -> 2^7 = 0x70 | +0
    "two_to_minus_127": (0x0040, (0, 0x38), (0, 0x00)),
    "two_to_minus_120": (0x0380, (0, 0x70), (0, 0x00)),
    # amax 0: byte 0 and signed zeros under both rules
    "plus_zero": (0x0000, (0, 0x00), (0, 0x00)),
    "minus_zero": (0x8000, (0, 0x80), (0, 0x80)),
    # 448 * 2^-126 = 2^-118 * 1.75: d = 2^-126, a normal float32, byte 1 under both: 448 = 0x7E
    "amax_448_times_2_to_minus_126": (0x04E0, (1, 0x7E), (1, 0x7E)),
}


@pytest.mark.parametrize("scale_zero", ["exact", "flush"])
@pytest.mark.parametrize("case", sorted(SCALE_ZERO_CASES))
def test_scale_byte_zero_blocks(case, scale_zero):
    bits, exact, flush = SCALE_ZERO_CASES[case]
    want_scale, want_code = exact if scale_zero == "exact" else flush
    x = torch.zeros(1, 32, dtype=torch.int16)
    x[0, 0] = bits - (1 << 16) if bits & 0x8000 else bits
    x = x.view(torch.bfloat16)
    for quantize in (quantize_mxfp8, reference_quantize_mxfp8):  # fast kernels + post-pass, and the reference
        q, s = quantize(x, "rceil", scale_zero=scale_zero)
        assert s.tolist() == [[want_scale]]
        assert q.view(torch.uint8)[0].tolist() == [want_code] + [0] * 31
    ref_q, ref_s = reference_mxfp8(x, "rceil", scale_zero)
    assert torch.equal(ref_q, q.view(torch.uint8)) and s.dtype == torch.uint8 and torch.equal(ref_s, s)



def test_flush_changes_only_scale_zero_blocks_mixed_with_others(backend):
    """A tensor with scale-0 blocks (subnormal values of both signs) among ordinary ones: FLUSH
    zeroes exactly the values of the scale-0 blocks, keeping their signs, in every path."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 256, generator=gen)
    x[::3] *= 2.0**-125  # rows of tiny blocks: amax about 2^-123, scale byte 0
    x[1, 32:64] = 0.0
    x[1, 40] = -0.0
    x = x.to(torch.bfloat16)
    q_exact, s = quantize_mxfp8(x)
    q_flush, s_flush = quantize_mxfp8(x, scale_zero="flush")
    assert torch.equal(s, s_flush) and int((s == 0).sum()) > 16
    zero = (s == 0).repeat_interleave(32, dim=-1)
    a, b = q_exact.view(torch.uint8), q_flush.view(torch.uint8)
    assert torch.equal(a[~zero], b[~zero])
    assert torch.equal(b[zero], torch.signbit(x)[zero].to(torch.uint8) << 7)
    assert bool((a[zero] & 0x7F).ne(0).any())  # the exact rule keeps information there
    for path in (reference_quantize_mxfp8,):
        q, s2 = path(x, scale_zero="flush")
        assert torch.equal(q.view(torch.uint8), b) and torch.equal(s2, s)
    ref_q, ref_s = reference_mxfp8(x, "rceil", "flush")
    assert torch.equal(ref_q, b) and s.dtype == torch.uint8 and torch.equal(ref_s, s)


def test_flush_from_fp8_sources_takes_the_sign_of_the_fp8_code(backend):
    """FP8 sources (requantized): small codes (at most 0.4375) under a tile scale of 2^-117 make
    every block of that tile scale byte 0; the fast path's post-pass gives the BF16 value's sign
    (the code's, the scale being positive), as the reference that materializes the BF16 values
    does."""
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 256, (256, 256), generator=gen, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x80  # no NaN codes; more -0 codes
    for tile in (codes[:128, :128], codes[128:, 128:]):
        tile.copy_((tile & 0x80) | torch.minimum(tile & 0x7F, torch.tensor(0x2E)))
    weight = codes.view(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[2.0**-117, 0.5], [1e-3, 2.0**-117]], dtype=torch.float32)
    from converter.numerics import kernels

    assert kernels.requantize_fp8(weight, scale_inv, "rceil") is not None  # the fast path, then the post-pass
    for scale_zero in ("exact", "flush"):
        q, s = requantize_fp8_block(weight, scale_inv, scale_zero=scale_zero)
        ref_q, ref_s = reference_requantize_fp8_block(weight, scale_inv, scale_zero=scale_zero)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and s.dtype == torch.uint8 and torch.equal(s, ref_s)
    zero = (s == 0).repeat_interleave(32, dim=-1)
    assert bool(zero[:128, :128].all()) and not bool(zero[:128, 128:].any()) and bool(zero[128:, 128:].all())
    flushed = q.view(torch.uint8)[zero]
    assert torch.equal(flushed, codes[zero] & 0x80)


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
    assert torch.equal(ref_q, q.view(torch.uint8)) and s.dtype == torch.uint8 and torch.equal(ref_s, s)


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
    assert s.dtype == torch.uint8 and torch.equal(s, ref_s)


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


@pytest.mark.cuda
def test_flush_on_cuda_tensors_gives_the_cpu_bytes():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 512, generator=gen)
    x[::2] *= 2.0**-125
    x = x.to(torch.bfloat16)
    codes = torch.randint(0, 256, (256, 256), generator=gen, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x80
    codes[:128] = (codes[:128] & 0x80) | torch.minimum(codes[:128] & 0x7F, torch.tensor(0x2E))
    weight, scale_inv = codes.view(torch.float8_e4m3fn), torch.tensor([[2.0**-117] * 2, [0.5] * 2])
    for scale_zero in ("exact", "flush"):
        for cpu, cuda in ((quantize_mxfp8(x, scale_zero=scale_zero), quantize_mxfp8(x.cuda(), scale_zero=scale_zero)),
                          (requantize_fp8_block(weight, scale_inv, scale_zero=scale_zero),
                           requantize_fp8_block(weight.cuda(), scale_inv.cuda(), scale_zero=scale_zero))):
            assert torch.equal(cpu[0].view(torch.uint8), cuda[0].cpu().view(torch.uint8))
            assert torch.equal(cpu[1], cuda[1].cpu()) and bool((cpu[1] == 0).any())
