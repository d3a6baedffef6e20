"""Running one planned job: source tensors in, output tensors out. No I/O of its own: tensors
arrive through `load` (already on the compute device) and leave as a name -> tensor dict."""

from __future__ import annotations

from typing import Callable

import torch

from converter.numerics.dispatch import dequantize_fp8_block, quantize_mxfp8, requantize_fp8_block
from converter.numerics.reference import relayout_ue8m0
from converter.plan.planner import (
    COPY,
    DEQUANT_BF16,
    FROM_FP8,
    FROM_UE8M0,
    MXFP8,
    TRTLLM_W2,
    TRTLLM_W13,
    UNPACK_W2,
    UNPACK_W13,
    Job,
    Operand,
)
from converter.plan.recipe import Recipe

Loader = Callable[[str], torch.Tensor]


def to_mxfp8(op: Operand, load: Loader, recipe: Recipe, out: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear weight as canonical MXFP8 (e4m3 [N, K], uint8 [N, K/32]), possibly in `out`."""
    weight = load(op.weight)
    if op.prep == FROM_UE8M0:
        return relayout_ue8m0(weight, load(op.scale), name=op.weight, allow_nonfinite=recipe.allow_nonfinite)
    if op.prep == FROM_FP8:
        return requantize_fp8_block(weight, load(op.scale), recipe.scale_rule,
                                    allow_nonfinite=recipe.allow_nonfinite, name=op.weight, out=out,
                                    scale_zero=recipe.scale_zero_blocks)
    return quantize_mxfp8(weight, recipe.scale_rule, allow_nonfinite=recipe.allow_nonfinite, name=op.weight,
                          out=out, scale_zero=recipe.scale_zero_blocks)


def run_job(job: Job, load: Loader, recipe: Recipe, out: dict[str, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
    """Outputs by name. `out` may hold preallocated buffers for the planned outputs (the executor
    reuses memory this way); a job may use them or not, its returned tensors are what counts."""
    names = [t.name for t in job.outputs]
    bufs = [(out or {}).get(n) for n in names]
    if job.action == COPY:
        return {names[0]: load(job.operands[0].weight)}
    if job.action == DEQUANT_BF16:
        op = job.operands[0]
        return {names[0]: dequantize_fp8_block(load(op.weight), load(op.scale), out=bufs[0])}
    if job.action == MXFP8:
        pair = (bufs[0], bufs[1]) if bufs[0] is not None and bufs[1] is not None else None
        return dict(zip(names, to_mxfp8(job.operands[0], load, recipe, pair)))
    if job.action == TRTLLM_W13:
        from converter.numerics.trtllm_layout import pack_w13

        gate_q, gate_s = to_mxfp8(job.operands[0], load, recipe)
        up_q, up_s = to_mxfp8(job.operands[1], load, recipe)
        return dict(zip(names, pack_w13(gate_q, gate_s, up_q, up_s)))
    if job.action == TRTLLM_W2:
        from converter.numerics.trtllm_layout import pack_w2

        return dict(zip(names, pack_w2(*to_mxfp8(job.operands[0], load, recipe))))
    if job.action in (UNPACK_W13, UNPACK_W2):
        from converter.numerics.trtllm_layout import unpack_w2, unpack_w13

        op = job.operands[0]
        unpack = unpack_w13 if job.action == UNPACK_W13 else unpack_w2
        return dict(zip(names, unpack(load(op.weight), load(op.scale))))
    raise ValueError(f"unknown job action {job.action!r}")
