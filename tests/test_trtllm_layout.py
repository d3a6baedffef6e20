"""Tests for converter.numerics.trtllm_layout: FlashInfer trtllm-gen MXFP8 MoE weight layout.

References, each independent of the module under test:
- FlashInfer's own row-index helpers and shuffle functions (skipped when flashinfer-python
  is not installed or cannot be imported here);
- the 128x4 byte-offset formula of SPEC section 4, written out in this file;
- hand-written expectations of which source row lands where (gate/up order).
Every byte comparison is torch.equal on uint8 views.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from converter.errors import NumericsError
from converter.numerics.trtllm_layout import (
    LAYOUT_METADATA,
    gated_interleave_row_indices,
    pack_w2,
    pack_w13,
    shuffle_row_indices,
    swizzle_scales_128x4,
    unpack_w2,
    unpack_w13,
    unswizzle_scales_128x4,
    w13_row_indices,
)

E4M3 = torch.float8_e4m3fn
U8 = torch.uint8
DEEPSEEK_HIDDEN = 7168
DEEPSEEK_MOE_INTERMEDIATE = 2048

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------- helpers


def random_bytes(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, cols), dtype=U8, generator=generator)


def random_expert_matrix(rows: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical MXFP8 pair (e4m3 [rows, k], uint8 [rows, k/32]) filled with random bytes."""
    return random_bytes(rows, k, seed).view(E4M3), random_bytes(rows, k // 32, seed + 1)


def swizzle_offset(r: int, c: int, cols: int) -> int:
    """SPEC section 4: flat offset of scale byte (r, c) in the 128x4-swizzled layout."""
    return ((r // 128) * (cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def reference_swizzle(scale: torch.Tensor) -> torch.Tensor:
    """Scatter every byte to its formula offset (vectorised; no reshape/permute tricks)."""
    rows, cols = scale.shape
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    offsets = ((r // 128) * (cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    out = torch.full((rows * cols,), 0, dtype=U8)
    out[offsets.reshape(-1)] = scale.reshape(-1)
    return out.reshape(rows, cols)


def reference_unswizzle(swizzled: torch.Tensor) -> torch.Tensor:
    rows, cols = swizzled.shape
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    offsets = ((r // 128) * (cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return swizzled.reshape(-1)[offsets.reshape(-1)].reshape(rows, cols)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(U8).cpu(), b.view(U8).cpu())


@pytest.fixture(scope="module")
def fi():
    """FlashInfer's pure-torch layout helpers, or a clean skip.

    flashinfer.utils and flashinfer.fused_moe.core are where the helpers live; importing them
    runs flashinfer/__init__, which on some CPU-only machines fails in odd ways (CUDA probing,
    JIT set-up), so any exception means skip rather than error.
    """
    try:
        with warnings.catch_warnings():  # its import pulls in kernels full of deprecation notes
            warnings.simplefilter("ignore")
            import flashinfer
            from flashinfer import utils
            from flashinfer.fused_moe import core
    except Exception as exc:  # noqa: BLE001 - any import-time failure means "not usable here"
        pytest.skip(f"flashinfer not importable here: {exc!r}")

    class Helpers:
        version = getattr(flashinfer, "__version__", "unknown")
        shuffle_rows = staticmethod(utils.get_shuffle_matrix_a_row_indices)
        shuffle_sf_rows = staticmethod(utils.get_shuffle_matrix_sf_a_row_indices)
        gated_rows = staticmethod(core.get_reorder_rows_for_gated_act_gemm_row_indices)
        w3_w1_rows = staticmethod(core._maybe_get_cached_w3_w1_permute_indices)
        reorder_rows_for_gated_act_gemm = staticmethod(core.reorder_rows_for_gated_act_gemm)
        shuffle_matrix_a = staticmethod(flashinfer.shuffle_matrix_a)
        shuffle_matrix_sf_a = staticmethod(flashinfer.shuffle_matrix_sf_a)
        block_scale_interleave = staticmethod(flashinfer.block_scale_interleave)

    return Helpers


# ------------------------------------------------- 1. row permutations against FlashInfer


@pytest.mark.parametrize("m", [128, 256, 4096, 2 * DEEPSEEK_MOE_INTERMEDIATE, DEEPSEEK_HIDDEN, 2 * 256])
@pytest.mark.parametrize("epilogue_tile_m", [128, 64])
def test_shuffle_indices_match_flashinfer(fi, m, epilogue_tile_m):
    expected = fi.shuffle_rows(torch.empty(m, 1, dtype=U8), epilogue_tile_m)
    assert torch.equal(shuffle_row_indices(m, epilogue_tile_m), expected)


@pytest.mark.parametrize("m", [2, 256, 4096, 2 * DEEPSEEK_MOE_INTERMEDIATE, 2 * 256])
def test_gated_interleave_indices_match_flashinfer(fi, m):
    expected = fi.gated_rows(torch.empty(m, 1, dtype=U8))
    assert torch.equal(gated_interleave_row_indices(m), expected)


@pytest.mark.parametrize("m", [256, 4096, 2 * DEEPSEEK_MOE_INTERMEDIATE, 2 * 512])
def test_w13_indices_match_flashinfer_w3_w1_chain(fi, m):
    dummy = torch.empty(m, 1, dtype=U8)
    chained = fi.gated_rows(dummy)[fi.shuffle_rows(dummy, 128)]
    assert torch.equal(w13_row_indices(m), chained)
    # The composed helper that vLLM's trtllm preparation uses, with a fresh cache.
    assert torch.equal(w13_row_indices(m), fi.w3_w1_rows({}, dummy, 128))
    # ...and the scale-factor variant FlashInfer uses for the MXFP8 scales.
    assert torch.equal(w13_row_indices(m), fi.w3_w1_rows({}, dummy, 128, num_elts_per_sf=32))


def flashinfer_cpu_preparation(fi, gate_q, gate_s, up_q, up_s, down_q, down_s):
    """SGLang's MXFP8 trtllm-gen preparation with FlashInfer's CPU-capable helpers.

    SGLang loads w13 as [w3 (up); w1 (gate)] for this backend; block_scale_interleave needs
    CUDA, so the reference swizzle of this file stands in for it here.
    """
    w13 = torch.cat([up_q.view(U8), gate_q.view(U8)])
    w13_scale = torch.cat([up_s, gate_s])
    w13_expected = fi.shuffle_matrix_a(fi.reorder_rows_for_gated_act_gemm(w13), 128)
    interleaved_scale = fi.reorder_rows_for_gated_act_gemm(w13_scale)
    sf_rows = fi.shuffle_sf_rows(interleaved_scale, 128)
    w13_scale_expected = reference_swizzle(interleaved_scale[sf_rows])
    w2_expected = fi.shuffle_matrix_a(down_q.view(U8), 128)
    w2_scale_expected = reference_swizzle(down_s[fi.shuffle_sf_rows(down_s, 128)])
    return w13_expected, w13_scale_expected, w2_expected, w2_scale_expected


@pytest.mark.parametrize(
    "inter, hidden", [(128, 256), (256, 512), (DEEPSEEK_MOE_INTERMEDIATE, DEEPSEEK_HIDDEN)]
)
def test_pack_matches_flashinfer_cpu_helpers(fi, inter, hidden):
    gate_q, gate_s = random_expert_matrix(inter, hidden, seed=1)
    up_q, up_s = random_expert_matrix(inter, hidden, seed=3)
    down_q, down_s = random_expert_matrix(hidden, inter, seed=5)
    w13_e, w13_s_e, w2_e, w2_s_e = flashinfer_cpu_preparation(fi, gate_q, gate_s, up_q, up_s, down_q, down_s)

    w13_q, w13_s = pack_w13(gate_q, gate_s, up_q, up_s)
    w2_q, w2_s = pack_w2(down_q, down_s)
    assert w13_q.dtype == E4M3 and w2_q.dtype == E4M3
    assert w13_s.dtype == U8 and w2_s.dtype == U8
    assert same_bytes(w13_q, w13_e)
    assert same_bytes(w13_s, w13_s_e)
    assert same_bytes(w2_q, w2_e)
    assert same_bytes(w2_s, w2_s_e)


# ---------------------------------------------------------- 2. the 128x4 scale swizzle


def test_swizzle_matches_offset_formula_with_loops():
    rows, cols = 256, 8
    # Two planes that name each byte's source: row (fits a byte, rows <= 256) and column.
    row_plane = torch.arange(rows, dtype=torch.int64).unsqueeze(1).expand(rows, cols).to(U8)
    col_plane = torch.arange(cols, dtype=torch.int64).unsqueeze(0).expand(rows, cols).to(U8)
    row_out = swizzle_scales_128x4(row_plane.contiguous())
    col_out = swizzle_scales_128x4(col_plane.contiguous())
    assert row_out.shape == (rows, cols) and row_out.dtype == U8
    flat_rows, flat_cols = row_out.reshape(-1).tolist(), col_out.reshape(-1).tolist()
    for r in range(rows):
        for c in range(cols):
            offset = swizzle_offset(r, c, cols)
            assert (flat_rows[offset], flat_cols[offset]) == (r, c), (r, c, offset)


def test_swizzle_first_tile_by_hand():
    # Spot values of the formula, worked by hand: (1, 0) -> 16, (32, 0) -> 4, (0, 4) -> 512.
    scale = torch.zeros(128, 8, dtype=U8)
    scale[1, 0], scale[32, 0], scale[0, 4], scale[127, 7] = 11, 22, 33, 44
    flat = swizzle_scales_128x4(scale).reshape(-1)
    assert (flat[16].item(), flat[4].item(), flat[512].item()) == (11, 22, 33)
    assert flat[512 + 31 * 16 + 3 * 4 + 3].item() == 44
    assert int((flat != 0).sum()) == 4


@pytest.mark.parametrize("rows, cols", [(512, DEEPSEEK_HIDDEN // 32), (DEEPSEEK_HIDDEN, DEEPSEEK_MOE_INTERMEDIATE // 32)])
def test_swizzle_matches_formula_on_random_bytes(rows, cols):
    scale = random_bytes(rows, cols, seed=7)
    swizzled = swizzle_scales_128x4(scale)
    assert same_bytes(swizzled, reference_swizzle(scale))
    assert not torch.equal(swizzled, scale)
    assert same_bytes(unswizzle_scales_128x4(swizzled), scale)
    assert same_bytes(unswizzle_scales_128x4(scale), reference_unswizzle(scale))


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(100, 8, dtype=U8),  # rows not a multiple of 128
        torch.zeros(128, 6, dtype=U8),  # columns not a multiple of 4
        torch.zeros(128, 8, dtype=torch.float32),  # not raw exponent bytes
        torch.zeros(128 * 8, dtype=U8),  # not 2-D
    ],
)
def test_swizzle_rejects_bad_input(bad):
    with pytest.raises(NumericsError):
        swizzle_scales_128x4(bad)
    with pytest.raises(NumericsError):
        unswizzle_scales_128x4(bad)


# ---------------------------------------------------------------------- 3. round trips


@pytest.mark.parametrize("inter, hidden", [(128, 128), (256, 512), (384, 256)])
def test_w13_round_trip_and_not_identity(inter, hidden):
    gate_q, gate_s = random_expert_matrix(inter, hidden, seed=11)
    up_q, up_s = random_expert_matrix(inter, hidden, seed=13)
    w13_q, w13_s = pack_w13(gate_q, gate_s, up_q, up_s)
    assert w13_q.shape == (2 * inter, hidden) and w13_s.shape == (2 * inter, hidden // 32)
    # Guard against a no-op or a plain concatenation in either order.
    for first, second, first_s, second_s in ((up_q, gate_q, up_s, gate_s), (gate_q, up_q, gate_s, up_s)):
        assert not same_bytes(w13_q, torch.cat([first.view(U8), second.view(U8)]))
        assert not same_bytes(w13_s, torch.cat([first_s, second_s]))
    gate_q2, gate_s2, up_q2, up_s2 = unpack_w13(w13_q, w13_s)
    assert gate_q2.dtype == E4M3 and up_q2.dtype == E4M3 and gate_s2.dtype == U8
    assert same_bytes(gate_q2, gate_q) and same_bytes(gate_s2, gate_s)
    assert same_bytes(up_q2, up_q) and same_bytes(up_s2, up_s)


@pytest.mark.parametrize("hidden, inter", [(128, 128), (512, 256), (DEEPSEEK_HIDDEN, 256)])
def test_w2_round_trip_and_not_identity(hidden, inter):
    down_q, down_s = random_expert_matrix(hidden, inter, seed=17)
    w2_q, w2_s = pack_w2(down_q, down_s)
    assert not same_bytes(w2_q, down_q)
    assert not same_bytes(w2_s, down_s)
    down_q2, down_s2 = unpack_w2(w2_q, w2_s)
    assert down_q2.dtype == E4M3 and down_s2.dtype == U8
    assert same_bytes(down_q2, down_q) and same_bytes(down_s2, down_s)


def test_pack_accepts_strided_views():
    # Transposed-then-transposed-back tensors are non-contiguous views of the same values.
    gate_q, gate_s = random_expert_matrix(128, 256, seed=19)
    up_q, up_s = random_expert_matrix(128, 256, seed=21)
    strided = [t.t().contiguous().t() for t in (gate_q.view(U8), gate_s, up_q.view(U8), up_s)]
    assert not strided[0].is_contiguous()
    packed = pack_w13(strided[0].view(E4M3), strided[1], strided[2].view(E4M3), strided[3])
    expected = pack_w13(gate_q, gate_s, up_q, up_s)
    assert same_bytes(packed[0], expected[0]) and same_bytes(packed[1], expected[1])


# ------------------------------------------------------------------- 4. gate/up order


def tagged_rows(inter: int, hidden: int, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that say where they came from: byte 0 = tag, bytes 1/2 = row index (low/high)."""
    q = torch.zeros(inter, hidden, dtype=U8)
    q[:, 0] = tag
    q[:, 1] = torch.arange(inter) % 256
    q[:, 2] = torch.arange(inter) // 256
    s = torch.zeros(inter, hidden // 32, dtype=U8)
    s[:, 0] = tag
    s[:, 1] = torch.arange(inter) % 256
    return q.view(E4M3), s


GATE, UP = 1, 3
# Source of w13 rows 0..31 for an expert, worked out by hand from SPEC section 4: the
# interleave gives [up0, gate0, up1, gate1, ...]; the 32-row shuffle then takes interleaved
# row (p % 8) * 4 + p // 8 into row p.
EXPECTED_W13_FIRST_BLOCK = (
    [(UP, r) for r in (0, 2, 4, 6, 8, 10, 12, 14)]
    + [(GATE, r) for r in (0, 2, 4, 6, 8, 10, 12, 14)]
    + [(UP, r) for r in (1, 3, 5, 7, 9, 11, 13, 15)]
    + [(GATE, r) for r in (1, 3, 5, 7, 9, 11, 13, 15)]
)


def test_w13_rows_come_from_up_then_gate_as_written():
    inter, hidden = 256, 128
    gate_q, gate_s = tagged_rows(inter, hidden, GATE)
    up_q, up_s = tagged_rows(inter, hidden, UP)
    w13_q, w13_s = pack_w13(gate_q, gate_s, up_q, up_s)
    rows = w13_q.view(U8)
    scale_rows = reference_unswizzle(w13_s)

    def source(p):
        return int(rows[p, 0]), int(rows[p, 1]) + 256 * int(rows[p, 2])

    assert [source(p) for p in range(32)] == EXPECTED_W13_FIRST_BLOCK
    # The next blocks continue with rows 16.. and the last row is the last gate row.
    assert source(32) == (UP, 16) and source(40) == (GATE, 16) and source(56) == (GATE, 17)
    assert source(2 * inter - 1) == (GATE, inter - 1)
    # Scales travel with their rows.
    for p in range(2 * inter):
        tag, row = source(p)
        assert (int(scale_rows[p, 0]), int(scale_rows[p, 1])) == (tag, row % 256), p


def test_gated_interleave_puts_up_first():
    inter = 128
    gate_q, _ = tagged_rows(inter, 128, GATE)
    up_q, _ = tagged_rows(inter, 128, UP)
    stacked = torch.cat([up_q.view(U8), gate_q.view(U8)])
    interleaved = stacked[gated_interleave_row_indices(2 * inter)]
    assert [(int(interleaved[p, 0]), int(interleaved[p, 1])) for p in range(4)] == [
        (UP, 0), (GATE, 0), (UP, 1), (GATE, 1)
    ]


def test_w2_rows_as_written():
    hidden, inter = 256, 128
    down_q, down_s = tagged_rows(hidden, inter, 5)
    w2_q, _ = pack_w2(down_q, down_s)
    rows = w2_q.view(U8)
    # Row p of each 32-row block comes from row (p % 8) * 4 + p // 8 of that block.
    expected = [0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
                2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31]
    assert [int(rows[p, 1]) for p in range(32)] == expected
    assert [int(rows[p, 1]) for p in range(32, 64)] == [32 + e for e in expected]


# ---------------------------------------------------------- index cache and validation


def test_index_functions_return_fresh_copies():
    first = shuffle_row_indices(256)
    first.zero_()  # a caller scribbling on its copy must not reach the cache
    assert torch.equal(torch.sort(shuffle_row_indices(256)).values, torch.arange(256))
    w13_idx = w13_row_indices(256)
    w13_idx.fill_(7)
    gate_q, gate_s = tagged_rows(128, 128, GATE)
    up_q, up_s = tagged_rows(128, 128, UP)
    rows = pack_w13(gate_q, gate_s, up_q, up_s)[0].view(U8)
    assert (int(rows[1, 0]), int(rows[1, 1])) == (UP, 2)


def test_cache_key_distinguishes_size_and_tile():
    assert not torch.equal(shuffle_row_indices(256, 128), shuffle_row_indices(256, 64))
    assert shuffle_row_indices(512).shape == (512,) and shuffle_row_indices(256).shape == (256,)
    assert not torch.equal(w13_row_indices(256)[:128], w13_row_indices(512)[:128])
    assert w13_row_indices(256, device="cpu").device.type == "cpu"
    assert w13_row_indices(256).dtype == torch.int64


@pytest.mark.parametrize(
    "call",
    [
        lambda: shuffle_row_indices(100),
        lambda: shuffle_row_indices(0),
        lambda: gated_interleave_row_indices(7),
        lambda: w13_row_indices(48),
        lambda: shuffle_row_indices(256, epilogue_tile_m=0),
    ],
)
def test_index_functions_reject_bad_sizes(call):
    with pytest.raises(NumericsError):
        call()


def test_pack_rejects_bad_inputs():
    gate_q, gate_s = random_expert_matrix(128, 256, seed=23)
    up_q, up_s = random_expert_matrix(128, 256, seed=29)
    odd_q, odd_s = random_expert_matrix(192, 256, seed=31)  # I = 192 is not a multiple of 128
    narrow_q = random_bytes(128, 96, seed=37).view(E4M3)  # H = 96
    cases = [
        lambda: pack_w13(odd_q, odd_s, odd_q, odd_s),
        lambda: pack_w13(narrow_q, random_bytes(128, 3, 1), narrow_q, random_bytes(128, 3, 1)),
        lambda: pack_w13(gate_q, gate_s.float(), up_q, up_s),
        lambda: pack_w13(gate_q.view(U8), gate_s, up_q, up_s),
        lambda: pack_w13(gate_q, gate_s, *random_expert_matrix(256, 256, seed=41)),
        lambda: pack_w13(gate_q, gate_s[:, :4], up_q, up_s),
        lambda: pack_w2(odd_q.view(U8).t().contiguous().view(E4M3), odd_s),
        lambda: unpack_w13(*random_expert_matrix(128, 256, seed=43)),  # 2I = 128 rows
    ]
    for case in cases:
        with pytest.raises(NumericsError):
            case()


def test_layout_metadata_is_honest_and_serialisable():
    meta = json.loads(json.dumps(LAYOUT_METADATA))
    assert meta["format"] == "flashinfer_trtllm_gen"
    assert meta["epilogue_tile_m"] == 128
    assert meta["gemm1_row_order"] == "up_gate_gated_interleave_shuffled"
    assert meta["scale_layout"] == "128x4_swizzled"
    assert meta["weight_layout"] == "MajorK"
    assert meta["valid_for"] == "expert_parallel"
    assert set(meta["tensor_names"]) == {"gemm1_weight", "gemm1_scale", "gemm2_weight", "gemm2_scale"}
    names = {k: v.format(layer=3, expert=0) for k, v in meta["tensor_names"].items()}
    assert len(set(names.values())) == 4


# ---------------------------------------------------------------------------- 5. CUDA


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("inter, hidden", [(256, 512), (DEEPSEEK_MOE_INTERMEDIATE, DEEPSEEK_HIDDEN)])
def test_pack_on_cuda_matches_cpu(inter, hidden):
    gate_q, gate_s = random_expert_matrix(inter, hidden, seed=51)
    up_q, up_s = random_expert_matrix(inter, hidden, seed=53)
    down_q, down_s = random_expert_matrix(hidden, inter, seed=55)
    cpu13 = pack_w13(gate_q, gate_s, up_q, up_s)
    cpu2 = pack_w2(down_q, down_s)
    gpu13 = pack_w13(*(t.cuda() for t in (gate_q, gate_s, up_q, up_s)))
    gpu2 = pack_w2(down_q.cuda(), down_s.cuda())
    assert all(t.device.type == "cuda" for t in (*gpu13, *gpu2))
    for gpu, cpu in zip((*gpu13, *gpu2), (*cpu13, *cpu2)):
        assert gpu.dtype == cpu.dtype and same_bytes(gpu, cpu)
    back = unpack_w13(*gpu13)
    for got, want in zip(back, (gate_q, gate_s, up_q, up_s)):
        assert got.device.type == "cuda" and same_bytes(got, want)
    assert same_bytes(swizzle_scales_128x4(gate_s.cuda()), swizzle_scales_128x4(gate_s))
    # Index tensors follow the device they were asked for, and agree across devices.
    gpu_idx = w13_row_indices(2 * inter, device="cuda")
    assert gpu_idx.device.type == "cuda" and torch.equal(gpu_idx.cpu(), w13_row_indices(2 * inter))
    assert w13_row_indices(2 * inter, device="cpu").device.type == "cpu"


def _flashinfer_cuda(fi, scale):
    try:
        return fi.block_scale_interleave(scale)
    except Exception as exc:  # noqa: BLE001 - JIT build / arch support failures: not our bug
        pytest.skip(f"flashinfer block_scale_interleave unavailable on this GPU: {exc!r}")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("rows, cols", [(256, 8), (4096, DEEPSEEK_HIDDEN // 32), (DEEPSEEK_HIDDEN, 64)])
def test_swizzle_matches_flashinfer_block_scale_interleave(fi, rows, cols):
    scale = random_bytes(rows, cols, seed=61).cuda()
    theirs = _flashinfer_cuda(fi, scale)
    assert theirs.numel() == rows * cols  # no padding at these sizes
    assert same_bytes(swizzle_scales_128x4(scale), theirs.reshape(rows, cols))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("inter, hidden", [(256, 512), (DEEPSEEK_MOE_INTERMEDIATE, DEEPSEEK_HIDDEN)])
def test_pack_matches_sglang_flashinfer_preparation(fi, inter, hidden):
    """SGLang's align_mxfp8_moe_weights_for_flashinfer_trtllm, per expert, on CUDA: w13 loaded
    as [w3; w1], rows reordered for the gated activation, then shuffled; scales reordered,
    shuffled with the SF row indices and interleaved by block_scale_interleave."""
    dev = torch.device("cuda")
    gate_q, gate_s = (t.to(dev) for t in random_expert_matrix(inter, hidden, seed=71))
    up_q, up_s = (t.to(dev) for t in random_expert_matrix(inter, hidden, seed=73))
    down_q, down_s = (t.to(dev) for t in random_expert_matrix(hidden, inter, seed=75))

    w13 = torch.cat([up_q, gate_q]).view(U8)  # SGLang swaps w1/w3 for this backend
    w13_scale = torch.cat([up_s, gate_s])
    reorder = fi.gated_rows(w13).to(dev)
    w13_interleaved, scale_interleaved = w13.index_select(0, reorder), w13_scale.index_select(0, reorder)
    w13_expected = w13_interleaved.index_select(0, fi.shuffle_rows(w13, 128).to(dev))
    sf_rows = fi.shuffle_sf_rows(scale_interleaved, 128).to(dev)
    w13_scale_expected = _flashinfer_cuda(fi, scale_interleaved.index_select(0, sf_rows)).reshape(2 * inter, -1)
    w2_expected = down_q.view(U8).index_select(0, fi.shuffle_rows(down_q.view(U8), 128).to(dev))
    w2_sf_rows = fi.shuffle_sf_rows(down_s, 128).to(dev)
    w2_scale_expected = _flashinfer_cuda(fi, down_s.index_select(0, w2_sf_rows)).reshape(hidden, -1)

    w13_q, w13_s = pack_w13(gate_q, gate_s, up_q, up_s)
    w2_q, w2_s = pack_w2(down_q, down_s)
    assert same_bytes(w13_q, w13_expected) and same_bytes(w13_s, w13_scale_expected)
    assert same_bytes(w2_q, w2_expected) and same_bytes(w2_s, w2_scale_expected)

    # The same through FlashInfer's one-call helpers (as vLLM's trtllm preparation uses them).
    w13_helper = fi.shuffle_matrix_a(fi.reorder_rows_for_gated_act_gemm(w13), 128)
    w13_scale_helper = fi.shuffle_matrix_sf_a(fi.reorder_rows_for_gated_act_gemm(w13_scale), 128, 32)
    assert same_bytes(w13_q, w13_helper)
    assert same_bytes(w13_s, w13_scale_helper.reshape(2 * inter, -1))
    assert same_bytes(w2_s, fi.shuffle_matrix_sf_a(down_s, 128, 32).reshape(hidden, -1))
