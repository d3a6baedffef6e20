"""FlashInfer TRT-LLM (trtllm-gen) MXFP8 MoE weight layout, per expert (SPEC section 4).

Pure functions of tensors: no file I/O, any torch device, and byte-identical results on CPU
and CUDA because every step is a gather of whole rows or a reshape/permute of bytes. Float8
tensors are moved as uint8 views so that `index_select` works on every device and no value
is ever converted.

The layout mirrors what SGLang builds at load time for `Fp8QuantizationType.MxFp8` with
`use_shuffled_weight=True` and `WeightLayout.MajorK`:
- gemm1 (w13): rows of [up; gate] gathered by P1 = gated interleave, then epilogue shuffle;
  its E8M0 scale gathered by the same P1, then 128x4-swizzled.
- gemm2 (w2): rows gathered by the epilogue shuffle P2; scale likewise, then swizzled.
A pre-shuffled checkpoint is only valid where each rank holds whole experts (expert
parallelism): the shuffle mixes rows within 32-row blocks, so tensor-parallel slicing of the
intermediate dimension after packing would corrupt the weights.
"""

from __future__ import annotations

import functools

import torch

from converter.errors import NumericsError

EPILOGUE_TILE_M = 128
MXFP8_BLOCK = 32  # elements per E8M0 scale along K
SCALE_TILE_ROWS = 128  # the 128x4 swizzle works on tiles of 128 rows x 4 scale columns
SCALE_TILE_COLS = 4

# Per-expert tensor names under `model.layers.{layer}.mlp.experts.{expert}.` for the packed
# layout; named after SGLang's FusedMoE parameters so a loader can tell them apart from the
# canonical gate_proj/up_proj/down_proj tensors that stock SGLang expects.
PACKED_TENSOR_SUFFIXES = {
    "gemm1_weight": "w13_weight",
    "gemm1_scale": "w13_weight_scale_inv",
    "gemm2_weight": "w2_weight",
    "gemm2_scale": "w2_weight_scale_inv",
}

LAYOUT_METADATA: dict = {
    "format": "flashinfer_trtllm_gen",
    "quantization": "mxfp8",
    "epilogue_tile_m": EPILOGUE_TILE_M,
    "shuffle_block_rows": 32,
    "gemm1_row_order": "up_gate_gated_interleave_shuffled",
    "gemm2_row_order": "shuffled",
    "scale_dtype": "uint8_e8m0",
    "scale_block_size": MXFP8_BLOCK,
    "scale_layout": "128x4_swizzled",
    "weight_layout": "MajorK",
    "valid_for": "expert_parallel",
    "tensor_names": {
        key: "model.layers.{layer}.mlp.experts.{expert}." + suffix
        for key, suffix in PACKED_TENSOR_SUFFIXES.items()
    },
    # Stock SGLang shuffles canonical weights itself at load time; loading these tensors
    # there without a loader that skips that step would shuffle them twice.
    "requires_loader_support": True,
}


# ----------------------------------------------------------------------------- row indices


def _shuffle_block_rows(epilogue_tile_m: int) -> int:
    # FlashInfer's get_shuffle_block_size: 32-row blocks when the tile is a multiple of 128.
    return 32 if epilogue_tile_m % 128 == 0 else 16


def _resolve_device(device) -> torch.device:
    """A device with its index filled in, so 'cuda' and 'cuda:0' share one cache entry and
    'cuda:1' never reuses tensors that live on 'cuda:0'."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cpu" and dev.index is None:
        dev = torch.empty(0, device=dev).device
    return dev


def _build_row_indices(kind: str, m: int, epilogue_tile_m: int) -> torch.Tensor:
    """Gather indices (out[p] = in[idx[p]]) built on the CPU with int64 arithmetic."""
    p = torch.arange(m, dtype=torch.int64)
    if kind == "shuffle":
        block = _shuffle_block_rows(epilogue_tile_m)
        groups = block // 8  # rows of a block are dealt out in groups of 8
        return (p // block) * block + (p % 8) * groups + (p % block) // 8
    if kind == "gated_interleave":
        half = m // 2
        return torch.where(p % 2 == 0, p // 2, half + p // 2)
    if kind == "w13":
        # Interleave first, then shuffle: out = in[interleave][shuffle] = in[interleave[shuffle]].
        interleave = _build_row_indices("gated_interleave", m, epilogue_tile_m)
        return interleave[_build_row_indices("shuffle", m, epilogue_tile_m)]
    if kind.startswith("inverse_"):
        forward = _build_row_indices(kind[len("inverse_"):], m, epilogue_tile_m)
        inverse = torch.empty_like(forward)
        inverse[forward] = p
        return inverse
    raise ValueError(f"unknown row-index kind {kind!r}")


@functools.lru_cache(maxsize=256)
def _cached_row_indices(kind: str, m: int, epilogue_tile_m: int, device: torch.device) -> torch.Tensor:
    # The key is everything the tensor depends on: SGLang once keyed such a cache by shape
    # alone and served stale indices after an RL pause/resume.
    return _build_row_indices(kind, m, epilogue_tile_m).to(device)


def _row_indices(kind: str, m: int, epilogue_tile_m: int, device) -> torch.Tensor:
    if m <= 0:
        raise NumericsError(f"row count must be positive, got {m}")
    if epilogue_tile_m <= 0:
        raise NumericsError(f"epilogue_tile_m must be positive, got {epilogue_tile_m}")
    block = _shuffle_block_rows(epilogue_tile_m)
    if kind in ("shuffle", "w13", "inverse_shuffle", "inverse_w13") and m % block:
        raise NumericsError(
            f"{m} rows cannot be shuffled for epilogue_tile_m={epilogue_tile_m}: "
            f"need a multiple of {block}"
        )
    if kind in ("gated_interleave", "w13", "inverse_w13") and m % 2:
        raise NumericsError(f"gated interleave needs an even row count (2 * intermediate), got {m}")
    return _cached_row_indices(kind, m, epilogue_tile_m, _resolve_device(device))


# The public index functions hand out copies: an in-place edit by a caller must never reach
# the cached tensor that every later pack call gathers with.
def shuffle_row_indices(m: int, epilogue_tile_m: int = EPILOGUE_TILE_M, device=None) -> torch.Tensor:
    """Epilogue-tile row shuffle P2 (FlashInfer get_shuffle_matrix_a_row_indices)."""
    return _row_indices("shuffle", m, epilogue_tile_m, device).clone()


def gated_interleave_row_indices(m: int, device=None) -> torch.Tensor:
    """[r0, r_I, r1, r_{I+1}, ...] for m = 2I rows (FlashInfer
    get_reorder_rows_for_gated_act_gemm_row_indices)."""
    return _row_indices("gated_interleave", m, EPILOGUE_TILE_M, device).clone()


def w13_row_indices(m: int, epilogue_tile_m: int = EPILOGUE_TILE_M, device=None) -> torch.Tensor:
    """P1: gated interleave, then epilogue shuffle, as one gather over the m = 2I rows of [up; gate]."""
    return _row_indices("w13", m, epilogue_tile_m, device).clone()


# --------------------------------------------------------------------------- scale swizzle


def _check_scale_matrix(scale: torch.Tensor, what: str) -> tuple[int, int]:
    if scale.dtype != torch.uint8:
        raise NumericsError(
            f"{what} must be uint8 E8M0 exponent bytes, got {scale.dtype} "
            "(a float or float8_e8m0fnu tensor would be converted by value, not by byte)"
        )
    if scale.dim() != 2:
        raise NumericsError(f"{what} must be 2-D [rows, K/32], got shape {tuple(scale.shape)}")
    rows, cols = scale.shape
    if rows % SCALE_TILE_ROWS or cols % SCALE_TILE_COLS:
        raise NumericsError(
            f"{what} of shape [{rows}, {cols}] cannot be 128x4-swizzled without padding: "
            f"rows must be a multiple of {SCALE_TILE_ROWS} and columns of {SCALE_TILE_COLS}"
        )
    return rows, cols


def swizzle_scales_128x4(scale: torch.Tensor) -> torch.Tensor:
    """Row-major uint8 [R, C] -> the 128x4-swizzled bytes, stored with the same shape [R, C].

    Byte (r, c) lands at flat offset ((r // 128) * (C / 4) + c // 4) * 512 + (r % 32) * 16
    + ((r % 128) // 32) * 4 + c % 4, as FlashInfer's block_scale_interleave writes it.
    """
    rows, cols = _check_scale_matrix(scale, "scale")
    tiles = scale.reshape(rows // 128, 4, 32, cols // 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).contiguous().reshape(rows, cols)


def unswizzle_scales_128x4(scale: torch.Tensor) -> torch.Tensor:
    """Exact inverse of swizzle_scales_128x4."""
    rows, cols = _check_scale_matrix(scale, "swizzled scale")
    tiles = scale.reshape(rows // 128, cols // 4, 32, 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).contiguous().reshape(rows, cols)


# ------------------------------------------------------------------------- pack / unpack


def _check_mxfp8_pair(q: torch.Tensor, s: torch.Tensor, what: str) -> tuple[int, int]:
    """Validate one canonical MXFP8 matrix: e4m3 [N, K] with uint8 scales [N, K/32]."""
    if q.dtype != torch.float8_e4m3fn:
        raise NumericsError(f"{what} weight must be float8_e4m3fn, got {q.dtype}")
    if q.dim() != 2:
        raise NumericsError(f"{what} weight must be 2-D, got shape {tuple(q.shape)}")
    if s.dtype != torch.uint8:
        raise NumericsError(f"{what} scale must be uint8 E8M0 exponent bytes, got {s.dtype}")
    rows, k = q.shape
    if rows % 128 or k % 128:
        raise NumericsError(
            f"{what} weight of shape [{rows}, {k}] does not fit the trtllm-gen layout: "
            "both dimensions must be multiples of 128"
        )
    if tuple(s.shape) != (rows, k // MXFP8_BLOCK):
        raise NumericsError(
            f"{what} scale has shape {tuple(s.shape)}, expected [{rows}, {k // MXFP8_BLOCK}] "
            f"for a [{rows}, {k}] weight with 1x{MXFP8_BLOCK} blocks"
        )
    if s.device != q.device:
        raise NumericsError(f"{what} weight is on {q.device} but its scale on {s.device}")
    return rows, k


def pack_w13(
    gate_q: torch.Tensor, gate_s: torch.Tensor, up_q: torch.Tensor, up_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical gate (w1) and up (w3) of one expert -> trtllm-gen gemm1 weight and scale.

    Returns (e4m3 [2I, H], uint8 [2I, H/32]): rows of [up; gate] gathered by P1; the scale
    gathered by P1, then 128x4-swizzled. The kernel reads the first half as the linear (up)
    operand and the second as the gate, so up goes first.
    """
    gate_shape = _check_mxfp8_pair(gate_q, gate_s, "gate_proj")
    up_shape = _check_mxfp8_pair(up_q, up_s, "up_proj")
    if gate_shape != up_shape:
        raise NumericsError(f"gate_proj {list(gate_shape)} and up_proj {list(up_shape)} differ in shape")
    if up_q.device != gate_q.device:
        raise NumericsError(f"gate_proj is on {gate_q.device} but up_proj on {up_q.device}")
    rows = 2 * gate_shape[0]
    idx = _row_indices("w13", rows, EPILOGUE_TILE_M, gate_q.device)
    weight_bytes = torch.cat([up_q.view(torch.uint8), gate_q.view(torch.uint8)], dim=0)
    scale = torch.cat([up_s, gate_s], dim=0)
    w13_q = weight_bytes.index_select(0, idx).view(torch.float8_e4m3fn)
    w13_s = swizzle_scales_128x4(scale.index_select(0, idx))
    return w13_q, w13_s


def unpack_w13(
    w13_q: torch.Tensor, w13_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of pack_w13: -> (gate_q, gate_s, up_q, up_s) in canonical layout."""
    rows, _ = _check_mxfp8_pair(w13_q, w13_s, "w13")
    if rows % 256:
        raise NumericsError(f"w13 has {rows} rows; 2 * intermediate with intermediate % 128 == 0 needed")
    inverse = _row_indices("inverse_w13", rows, EPILOGUE_TILE_M, w13_q.device)
    weight_bytes = w13_q.view(torch.uint8).index_select(0, inverse)
    scale = unswizzle_scales_128x4(w13_s).index_select(0, inverse)
    half = rows // 2
    up_q, gate_q = weight_bytes[:half], weight_bytes[half:]
    up_s, gate_s = scale[:half], scale[half:]
    e4m3 = torch.float8_e4m3fn
    return gate_q.view(e4m3), gate_s, up_q.view(e4m3), up_s


def pack_w2(down_q: torch.Tensor, down_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical down (w2) of one expert, e4m3 [H, I] + uint8 [H, I/32] -> trtllm-gen gemm2:
    rows gathered by P2; the scale gathered by P2, then 128x4-swizzled."""
    rows, _ = _check_mxfp8_pair(down_q, down_s, "down_proj")
    idx = _row_indices("shuffle", rows, EPILOGUE_TILE_M, down_q.device)
    w2_q = down_q.view(torch.uint8).index_select(0, idx).view(torch.float8_e4m3fn)
    w2_s = swizzle_scales_128x4(down_s.index_select(0, idx))
    return w2_q, w2_s


def unpack_w2(w2_q: torch.Tensor, w2_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of pack_w2: -> (down_q, down_s) in canonical layout."""
    rows, _ = _check_mxfp8_pair(w2_q, w2_s, "w2")
    inverse = _row_indices("inverse_shuffle", rows, EPILOGUE_TILE_M, w2_q.device)
    down_q = w2_q.view(torch.uint8).index_select(0, inverse).view(torch.float8_e4m3fn)
    down_s = unswizzle_scales_128x4(w2_s).index_select(0, inverse)
    return down_q, down_s
