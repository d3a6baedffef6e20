"""The compiled CPU kernels (converter/numerics/native.py, mxfp8.c): every input code and bit pattern against the
references, byte for byte, and the build: cached, optional, never required."""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys

import pytest
import torch
from reference import reference_fp8_dequant, reference_mxfp8

from converter.numerics import dispatch, kernels, native, reference
from converter.numerics.dispatch import dequantize_fp8_block, quantize_mxfp8, requantize_fp8_block

_REAL_DISPATCH = kernels._native


def _native_or_skip():
    """The compiled kernels; skipped only where there is no compiler at all (then mxconv runs the
    torch kernels, tested everywhere). A compiler that fails on our source fails the test."""
    if native._compiler() is None:
        pytest.skip("no C compiler here: mxconv uses the torch kernels (tested too)")
    built = native.load()
    assert built is not None, "the compiled kernels did not build"
    return built


_BASE_FLAGS = ["-O2", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
# build -> (the CPU flags it needs, its compiler flags)
_BUILDS = {
    "portable": ((), native.PORTABLE_FLAGS),  # no CPU-specific instructions: the plain C code
    "avx2": (("avx2",), ["-mavx2", *_BASE_FLAGS]),  # CPUs without AVX-512 (Zen 2/3, Haswell..)
    "avx512-no-vbmi": (("avx2", "avx512f", "avx512bw", "avx512vl"),  # Skylake-X, Cascade Lake
                       ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", *_BASE_FLAGS]),
}


@pytest.fixture(scope="module", params=["native", *_BUILDS])
def lib(request, tmp_path_factory):
    """The kernels as mxconv builds them (-march=native: AVX-512 and vpermi2b where the CPU has
    them) and as other CPUs get them (each instruction-set path of mxfp8.c), each dispatched to."""
    built = _native_or_skip()
    if request.param != "native":
        needs, flags = _BUILDS[request.param]
        if not set(needs) <= set(native._cpu_flags().split()):
            pytest.skip(f"this CPU lacks {', '.join(needs)}")
        path = tmp_path_factory.mktemp(request.param) / "mxfp8.so"
        assert native._build(native._compiler(), path, (flags,)) is None
        built = native.bind(ctypes.CDLL(str(path)))
    real = kernels._native
    kernels._native = lambda device: built if device.type == "cpu" else None
    yield built
    kernels._native = real


def _all_finite_bf16() -> torch.Tensor:
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return bits[torch.isfinite(bits)]


@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_every_finite_bf16_pattern(lib, rule):
    """All 65280 finite BF16 values, in blocks of similar magnitude (sorted) and of mixed ones."""
    x = _all_finite_bf16()
    g = torch.Generator().manual_seed(1)
    x = x[: len(x) // 32 * 32]
    for arranged in (x[x.float().abs().argsort()], x[torch.randperm(len(x), generator=g)]):
        q, s = quantize_mxfp8(arranged.view(-1, 256), rule)
        rq, rs = reference_mxfp8(arranged.view(-1, 256), rule)
        assert torch.equal(q.view(torch.uint8), rq) and torch.equal(s, rs)


def _tile_scales(count: int, g: torch.Generator) -> torch.Tensor:
    """Tile scales from subnormal to huge, both signs, DeepSeek's typical amax/448 among them."""
    edges = torch.tensor([2.0**-149, 2.0**-130, 1e-38, 2.0**-117, 1 / 448, 0.0, -0.0, 1.0, 2.0**100, 3.0e30])
    rand = torch.rand(count, generator=g) * torch.exp2(torch.randint(-140, 110, (count,), generator=g).float())
    s = torch.cat([edges, rand])
    return s * torch.where(torch.rand(len(s), generator=g) < 0.3, -1.0, 1.0)


@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_every_fp8_code_under_many_tile_scales(lib, rule):
    """Each 128x128 tile holds every non-NaN code, in blocks whose largest code varies (so a tile
    needs several block exponents), under 270 tile scales; bytes equal DeepSeek's dequant then the
    reference quantizer."""
    g = torch.Generator().manual_seed(2)
    scales = _tile_scales(260, g)
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    tiles = []
    for _ in range(len(scales)):
        tile = codes[torch.randint(0, len(codes), (128, 128), generator=g)]
        tile.view(-1)[: len(codes)] = codes
        caps = torch.randint(0, 0x7F, (128, 4, 1), generator=g, dtype=torch.uint8)  # largest |code| per block
        mag = torch.minimum(tile.view(128, 4, 32) & 0x7F, caps)
        tile = ((tile.view(128, 4, 32) & 0x80) | mag).view(128, 128)
        tile.view(-1)[: len(codes)] = codes
        tiles.append(tile)
    w = torch.cat(tiles, dim=1).view(torch.float8_e4m3fn)  # [128, 128 * tiles]
    s = scales.view(1, -1)
    ref = reference_fp8_dequant(w, s)
    q, sc = kernels.requantize_fp8(w, s, rule)
    rq, rs = quantize_mxfp8(ref.float(), rule)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


def test_piece_rows_not_a_multiple_of_128_and_partial_tiles(lib):
    """A 200 x 160 weight: a ragged last band and a 32-column last tile."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 256, (200, 160), generator=g, dtype=torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0
    w = w.view(torch.float8_e4m3fn)
    s = _tile_scales(0, g)[:4].abs().view(2, 2) + 1e-3
    q, sc = requantize_fp8_block(w, s)
    rq, rs = quantize_mxfp8(reference_fp8_dequant(w, s).float())
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


def test_many_bands_and_tiles_each_with_its_own_scale(lib):
    """Rows are walked band by band with every tile's state at hand: a 3-band x 5-tile weight
    whose tile scales (and so tables) differ from band to band and tile to tile, with each block's
    largest code drawn at random, so a table kept across tiles or bands would give wrong bytes."""
    g = torch.Generator().manual_seed(4)
    w = torch.randint(0, 256, (3 * 128 - 40, 5 * 128 - 96), generator=g, dtype=torch.uint8)
    caps = torch.randint(0, 0x7F, (w.shape[0], w.shape[1] // 32, 1), generator=g, dtype=torch.uint8)
    w = ((w.view(w.shape[0], -1, 32) & 0x80) | torch.minimum(w.view(w.shape[0], -1, 32) & 0x7F, caps)).view(w.shape)
    s = (torch.rand(3, 5, generator=g) * torch.exp2(torch.randint(-30, 10, (3, 5), generator=g).float()))
    s = s * torch.where(torch.rand(3, 5, generator=g) < 0.3, -1.0, 1.0)
    w = w.view(torch.float8_e4m3fn)
    for rule in ("rceil", "floor"):
        q, sc = requantize_fp8_block(w, s, rule)
        rq, rs = quantize_mxfp8(reference_fp8_dequant(w, s).float(), rule)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


@pytest.mark.parametrize("where", range(9))
def test_a_nonfinite_value_in_any_block_of_a_group_declines(lib, where):
    """BF16 blocks go four at a time, then one by one: NaN or Inf in any block, of a group or of
    the tail, makes the kernel decline (the reference then raises), and finite input of the same
    odd block count converts exactly."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)  # 9 blocks: two groups of 4, then 1
    rq, rs = reference_mxfp8(x)
    q, s = kernels.quantize_bf16(x, "rceil")
    assert torch.equal(q.view(torch.uint8), rq) and torch.equal(s, rs)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y.view(-1)[where * 32 + where % 32] = bad
        assert kernels.quantize_bf16(y, "rceil") is None


def test_too_few_scale_tiles_are_refused_before_any_read(lib):
    w = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    for kernel in (lambda s: kernels.requantize_fp8(w, s, "rceil"), lambda s: kernels.dequantize_fp8(w, s)):
        assert kernel(torch.ones(1, 2)) is None and kernel(torch.ones(2, 1)) is None


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


def test_dequant_every_fp8_code_under_many_tile_scales(lib):
    """DeepSeek's FP8 -> BF16 (the `bf16` recipe, kv_b_proj): every non-NaN code, both signs, in
    every 128x128 tile, under 270 tile scales from subnormal products to overflow (Inf), zero and
    -0 among them; a 3-band weight whose rows do not fill the last band. Bits equal the reference's."""
    g = torch.Generator().manual_seed(6)
    scales = _tile_scales(260, g)
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes[torch.randint(0, len(codes), (300, 128 * 90), generator=g)]
    for band in range(3):  # every code in every tile: 127 in each of the band's first two rows
        w.view(300, 90, 128)[band * 128: band * 128 + 2, :, :127] = codes.view(2, 1, 127)
    w = w.view(torch.float8_e4m3fn)
    s = scales.view(3, 90).clone()
    s[1, 5], s[2, 7] = 1e36, -(2.0**127)  # value * scale past float32's largest: Inf
    got = kernels.dequantize_fp8(w, s)
    assert got is not None  # the compiled kernel took it: nothing here is outside what it models
    assert torch.equal(_bf16_bits(got), _bf16_bits(reference_fp8_dequant(w, s)))
    assert torch.isinf(got.float()).any() and (got.view(torch.int16) == -32768).any()  # Inf and -0 were reached


@pytest.mark.parametrize("shape", [(1, 1), (130, 200), (128, 96), (257, 384 + 31)])
def test_dequant_ragged_shapes_and_tiles_each_with_its_own_scale(lib, shape):
    """Any K (whole 128-column tiles go 32 codes at a time, the rest one by one), ragged bands,
    each tile with its own scale and sign, into a caller's buffer."""
    g = torch.Generator().manual_seed(7)
    n, k = shape
    w = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0x7E
    w = w.view(torch.float8_e4m3fn)
    tiles = (-(-n // 128), -(-k // 128))
    s = torch.rand(tiles, generator=g) * torch.exp2(torch.randint(-20, 20, tiles, generator=g).float())
    s = s * torch.where(torch.rand(tiles, generator=g) < 0.5, -1.0, 1.0)
    out = torch.empty(n * k, dtype=torch.bfloat16)
    got = dequantize_fp8_block(w, s, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(_bf16_bits(got), _bf16_bits(reference_fp8_dequant(w, s)))


@pytest.mark.parametrize("col", [0, 127, 128 + 40, 256 + 2])
def test_dequant_declines_nan_codes_and_nonfinite_scales(lib, col):
    """A NaN code in a vector-walked tile or in the ragged tail, or a NaN/Inf tile scale: the kernel
    declines and the dispatcher gives the reference's bytes (NaN where the reference has them)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randint(0, 0x7F, (130, 259), generator=g, dtype=torch.uint8)
    s = torch.rand(2, 3, generator=g) + 0.5
    for code in (0x7F, 0xFF):
        bad = w.clone()
        bad[129, col] = code
        bad = bad.view(torch.float8_e4m3fn)
        assert kernels.dequantize_fp8(bad, s) is None
        got = dequantize_fp8_block(bad, s)
        assert torch.isnan(got[129, col]) and torch.equal(got[:129], reference_fp8_dequant(bad, s)[:129])
    for scale in (float("nan"), float("inf")):
        t = s.clone()
        t[1, col // 128] = scale
        assert kernels.dequantize_fp8(w.view(torch.float8_e4m3fn), t) is None


def test_dequant_and_requant_take_ue8m0_scales_through_the_kernels(lib, monkeypatch):
    """UE8M0 sources (V3.1 and later) store exponent bytes: the dispatcher gives the kernels
    2^(e - 127) in float32, the reference's own scales, and never falls back for them."""
    g = torch.Generator().manual_seed(9)
    w = torch.randint(0, 0x7F, (256, 384), generator=g, dtype=torch.uint8)
    w = (w | (torch.randint(0, 2, w.shape, generator=g, dtype=torch.uint8) << 7)).view(torch.float8_e4m3fn)
    e = torch.tensor([[0, 1, 127], [100, 150, 200]], dtype=torch.uint8)
    want = reference_fp8_dequant(w, torch.exp2(e.double() - 127).float())
    rq, rs = quantize_mxfp8(want.float())
    monkeypatch.setattr(reference, "dequantize_fp8_block", None)  # a fallback would fail loudly
    monkeypatch.setattr(dispatch, "quantize_mxfp8", None)  # requantization's fallback
    got = dequantize_fp8_block(w, e)
    assert torch.equal(_bf16_bits(got), _bf16_bits(want))
    q, sc = requantize_fp8_block(w, e)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


def test_scales_wider_and_longer_than_the_tiles_are_indexed_by_their_own_row_length(lib):
    """A scale tensor may have more columns (and rows) than the weight has tiles: each band's
    scales start a whole scale row apart, whatever the weight's width."""
    g = torch.Generator().manual_seed(10)
    w = torch.randint(0, 0x7F, (300, 200), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    s = torch.rand(4, 5, generator=g) * 4 + 0.25  # needs (3, 2)
    want = reference_fp8_dequant(w, s[:3, :2].contiguous())
    assert torch.equal(_bf16_bits(dequantize_fp8_block(w, s)), _bf16_bits(want))
    q, sc = requantize_fp8_block(w[:, :192], s)
    rq, rs = quantize_mxfp8(want[:, :192].float())
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


def test_other_one_byte_weights_are_left_to_the_reference(lib):
    """The kernels decode e4m3fn codes: an e5m2 weight (or any other one-byte dtype) must not reach
    them, whatever the scales' dtype."""
    w = torch.tensor([[1.0, 2.0, -3.5, 57344.0] * 32] * 128).to(torch.float8_e5m2)
    for s in (torch.ones(1, 1), torch.tensor([[127]], dtype=torch.uint8)):
        assert torch.equal(_bf16_bits(dequantize_fp8_block(w, s)), _bf16_bits(reference.dequantize_fp8_block(w, s)))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded in this process."""
    monkeypatch.setenv("MXCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(kernels, "_native", _REAL_DISPATCH)  # not a `lib` fixture's build
    return tmp_path / "cache"


def test_built_once_then_reused_from_the_cache(fresh):
    _native_or_skip()
    built = list(fresh.glob("mxfp8-*.so"))
    assert len(built) == 1 and not list(fresh.glob(".build-*"))
    stamp = built[0].stat().st_mtime_ns
    code = "from converter.numerics import native; assert native.load() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ})
    assert built[0].stat().st_mtime_ns == stamp and list(fresh.glob("mxfp8-*.so")) == built


@pytest.mark.parametrize("how", ["disabled", "no compiler", "compiler fails"])
def test_without_the_compiled_kernels_the_bytes_are_the_same(fresh, monkeypatch, tmp_path, how):
    x = torch.randn(64, 256).to(torch.bfloat16)
    if how == "disabled":
        monkeypatch.setenv("MXCONV_NATIVE", "0")
    elif how == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    else:
        broken = tmp_path / "cc"
        broken.write_text("#!/bin/sh\necho 'cc: internal compiler error' >&2\nexit 1\n")
        broken.chmod(0o755)
        monkeypatch.setattr(native, "_compiler", lambda: str(broken))
    if how == "disabled":
        assert native.load() is None
    else:
        with pytest.warns(native.NativeBuildWarning, match="torch kernels"):
            assert native.load() is None
    got, want = quantize_mxfp8(x), reference_mxfp8(x)
    assert torch.equal(got[0].view(torch.uint8), want[0]) and torch.equal(got[1], want[1])
    assert not list(fresh.glob("*.so"))  # nothing half-built left behind


def test_an_unwritable_cache_falls_back_to_a_temp_folder(fresh, monkeypatch, tmp_path):
    _native_or_skip()
    monkeypatch.setattr(native, "_loaded", {})
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MXCONV_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native.load() is not None
    assert len(list((tmp_path / "tmp").glob("mxconv-*/mxfp8-*.so"))) == 1


def test_verify_error_stats_in_one_pass_match_the_torch_code(lib):
    """mx_stats.c against verify's torch code (given the same values as float32): counts and
    maxima equal, SQNR equal to far below what any threshold looks at (the kernel sums in double,
    the torch code each chunk in float32). Gaussian blocks, blocks clipped by FLOOR, all-zero
    blocks, non-zero blocks stored as zeros, subnormal blocks, NaN/Inf in the source."""
    from converter.verify.jobs import error_stats

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(96, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (96, 1), generator=g).float()))
    x[3] = 0.0  # an all-zero row of blocks
    x[4, :32] = -0.0  # a block of -0 (codes 0x80): stored as zeros too
    x[5, :32] = 2.0**-130  # a subnormal block
    x = x.to(torch.bfloat16)
    for rule in ("rceil", "floor"):
        q, s = quantize_mxfp8(x, rule)
        q.view(torch.uint8)[7, 64:96] = 0  # a non-zero block stored as zeros: lost
        fast, slow = error_stats(x, q, s), error_stats(x.float(), q, s)
        assert kernels.error_stats_bf16(x, q, s, 464.0) is not None  # the kernel took the first
        assert abs(fast.pop("sqnr_db") - slow.pop("sqnr_db")) < 1e-4 and fast == slow
        assert fast["lost_blocks"] >= 1 and fast["zero_blocks"] >= 9 and (rule == "rceil") == (
            fast["saturated_fraction"] == 0)
    y = x.clone()
    y[9, 3], y[10, 40] = float("nan"), float("-inf")
    q, s = quantize_mxfp8(torch.where(torch.isfinite(y), y, 0), "rceil")
    fast, slow = error_stats(y, q, s), error_stats(y.float(), q, s)
    assert fast["nonfinite_source"] == slow["nonfinite_source"] == 2
    assert abs(fast.pop("sqnr_db") - slow.pop("sqnr_db")) < 1e-4 and fast == slow
    q.view(torch.uint8)[2, 2] = 0x7F  # a NaN code stored: the error is NaN, as verify judges it
    assert all(math.isnan(error_stats(x, q, s)[k]) for k in ("sqnr_db", "max_abs_err", "max_block_rel_err"))
