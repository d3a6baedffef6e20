"""Bytes and numerics checks of `mxconv verify`, streamed one planned job at a time.

Bytes: every output tensor is re-derived from the source with the conversion's own `run_job`
and compared with DST byte for byte (uint8 views); pre-shuffled TRT-LLM experts are also
un-shuffled to name the part that differs. Numerics: each MXFP8 weight, dequantized from the
bytes DST really holds, is compared with the source values (for FP8 sources, DeepSeek's
dequantized BF16). Memory is bounded by the largest job per worker.
"""

from __future__ import annotations

import math
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from converter.libc import libc
from converter.numerics import kernels
from converter.numerics.dispatch import dequantize_fp8_block, dequantize_mxfp8
from converter.numerics.reference import E4M3_MAX, MX_BLOCK, e8m0_to_float
from converter.plan.planner import (
    COPY,
    FROM_UE8M0,
    MXFP8,
    TRTLLM_W2,
    TRTLLM_W13,
    ConversionPlan,
    Job,
    Operand,
    natural_key,
)
from converter.plan.recipe import Recipe
from converter.plan.view import CanonicalView
from converter.run.transform import run_job
from converter.sources.safetensors import read_tensor
from converter.verify.checks import BYTES, NUMERICS, Destination, Failure

# |x| / scale at or above this would round past 448 (the next e4m3 step would be 480), so an
# element there was clipped by saturation; RCEIL never gets there, FLOOR does.
CLIP_LIMIT = E4M3_MAX + 16.0
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_SIBLINGS = {"gate_proj": "up_proj", "up_proj": "gate_proj"}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits.

    Weights: RCEIL MXFP8 of Gaussian-like weights gives about 31 dB SQNR (25 dB leaves room for
    heavy-tailed real weights); an element's error is at most half an e4m3 step, which is at most
    1/16 of its block's amax (a step of 32 in the top binade [256, 448], amax >= 256); RCEIL never
    clips (saturates) an element and never stores a non-zero block as zeros. FLOOR clips block
    maxima (errors up to 1/8 of amax) on most tensors, so it fails the error and clipping limits.

    Logits: calibrated on the random-weight demo model, which amplifies weight error far more
    than a trained model (its logits are near-ties, and a small change flips MoE routing, so a
    few positions diverge completely). Correct conversions of 16 demo models (BF16 and FP8
    sources, seeds 10-17) gave mean cosine 0.953-0.987, top-1 agreement 66-84 %, mean KL
    0.013-0.047; gross errors give cosine ~0.70 / top-1 12 % / KL 0.29 (gate and up swapped in
    every expert) or 0.24 / 2 % / 0.75 (every scale off by one). The limits sit between the two.
    They are loose for trained models (expect cosine > 0.99 there): tighten them for those.
    Bytes and numerics, not logits, are what catch a single wrong tensor.
    """

    min_sqnr_db: float = 25.0
    max_block_rel_err: float = 1.0 / 16
    max_saturated_fraction: float = 0.0
    max_lost_blocks: int = 0
    min_cosine: float = 0.90
    min_top1_agreement: float = 0.50
    max_kl: float = 0.12


@dataclass
class TensorNumerics:
    """Error of one MXFP8 weight (as DST stores it) against the source values."""

    name: str  # canonical weight name
    stored_as: str  # DST tensor holding it (differs for pre-shuffled experts)
    layer: int | None
    module: str  # module kind within its layer, experts folded: "mlp.experts.gate_proj"
    shape: tuple[int, ...]
    prep: str
    sqnr_db: float  # inf when exact
    max_abs_err: float
    max_block_rel_err: float  # max over 1x32 blocks of max |error| / source block amax
    saturated_fraction: float  # elements clipped at +-448 * scale
    zero_blocks: int  # blocks stored as all zeros
    lost_blocks: int  # ...of which the source block was not zero
    nonfinite_source: int  # NaN/Inf source elements, left out of the error (allow_nonfinite recipes)
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["problems"] = list(self.shape), list(self.problems)
        d["sqnr_db"] = None if math.isinf(self.sqnr_db) else self.sqnr_db
        d["exact"] = math.isinf(self.sqnr_db) and self.sqnr_db > 0
        return d


def layer_and_module(name: str) -> tuple[int | None, str]:
    m = _LAYER_RE.match(name)
    rest = m.group(2) if m else name
    rest = re.sub(r"\.experts\.\d+\.", ".experts.", rest)
    for suffix in (".weight", ".w13_weight", ".w2_weight"):
        rest = rest[: -len(suffix)] if rest.endswith(suffix) else rest
    return (int(m.group(1)) if m else None), rest


def error_stats(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, chunk_elems: int = 1 << 20) -> dict:
    """Error of MXFP8 (q, s) against x [N, K] (any float dtype); pure, runs on x's device. BF16 on
    a CPU goes through the compiled kernel (one pass; sums in double), anything else through
    torch in row chunks of about 1M elements: their temporaries (4 MB each) are reused from the
    allocator's heap, where 64 MB ones were fresh mappings, page-faulted every time."""
    fast = kernels.error_stats_bf16(x, q, s, CLIP_LIMIT)
    if fast is not None:
        signal, noise, max_abs, max_rel, clipped, zero_blocks, lost, nonfinite = fast
        return _stats(signal, noise, max_abs, max_rel, clipped, zero_blocks, lost, nonfinite, x.numel())
    rows = max(1, chunk_elems // max(x.shape[-1], 1))
    signal = noise = 0.0
    max_abs = max_rel = 0.0
    clipped = zero_blocks = lost = nonfinite = 0
    for start in range(0, x.shape[0], rows):
        xc = x[start:start + rows].to(torch.float32, copy=True)  # modified in place below
        qc, sc = q[start:start + rows], s[start:start + rows]
        err = dequantize_mxfp8(qc, sc).sub_(xc)
        finite = torch.isfinite(xc)
        if not bool(finite.all()):  # only with allow_nonfinite: measure the finite elements
            nonfinite += int((~finite).sum())
            xc, err = torch.where(finite, xc, 0.0), torch.where(finite, err, 0.0)
        flat_x, flat_err = xc.reshape(-1), err.reshape(-1)
        signal += float(torch.dot(flat_x, flat_x))  # a chunk's sum in float32, the total in double
        noise += float(torch.dot(flat_err, flat_err))
        # [blocks, 32] views: torch reduces a 2-D last axis far faster than a 3-D one on CPU
        mag = xc.abs_().reshape(-1, MX_BLOCK)
        amax = mag.amax(1)
        block_err = err.abs_().reshape(-1, MX_BLOCK).amax(1)
        rel = torch.where(amax > 0, block_err / amax.clamp(min=torch.finfo(torch.float32).tiny),
                          torch.where(block_err > 0, torch.full_like(amax, math.inf), torch.zeros_like(amax)))
        if err.numel():
            max_abs = max(max_abs, float(block_err.max()))
            max_rel = max(max_rel, float(rel.max()))
        clipped += int((mag.div_(e8m0_to_float(sc).reshape(-1, 1)) >= CLIP_LIMIT).sum())
        zero = (qc.view(torch.uint8).reshape(-1, MX_BLOCK) & 0x7F).amax(1) == 0  # 0x80 is -0
        zero_blocks += int(zero.sum())
        lost += int((zero & (amax > 0)).sum())
    return _stats(signal, noise, max_abs, max_rel, clipped, zero_blocks, lost, nonfinite, x.numel())


def _stats(signal, noise, max_abs, max_rel, clipped, zero_blocks, lost, nonfinite, numel) -> dict:
    if math.isnan(noise) or math.isnan(signal):
        sqnr = math.nan
    elif noise == 0:
        sqnr = math.inf
    else:
        sqnr = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    return {"sqnr_db": sqnr, "max_abs_err": max_abs, "max_block_rel_err": max_rel,
            "saturated_fraction": clipped / max(numel, 1), "zero_blocks": zero_blocks, "lost_blocks": lost,
            "nonfinite_source": nonfinite}


def judge(stats: dict, prep: str, t: Thresholds, allow_nonfinite: bool = False) -> tuple[str, ...]:
    """Which thresholds one weight's stats break (empty: it passes)."""
    problems = []
    if stats["nonfinite_source"] and not allow_nonfinite:
        problems.append(f"{stats['nonfinite_source']} NaN/Inf source values (the recipe does not allow them)")
    if any(math.isnan(stats[k]) for k in ("sqnr_db", "max_abs_err", "max_block_rel_err")):
        problems.append("NaN in the error (non-finite source or DST values)")
    if stats["sqnr_db"] < t.min_sqnr_db:
        problems.append(f"SQNR {stats['sqnr_db']:.2f} dB < {t.min_sqnr_db} dB")
    if stats["max_block_rel_err"] > t.max_block_rel_err:
        problems.append(f"max error {stats['max_block_rel_err']:.4f} of block amax > {t.max_block_rel_err:.4f}")
    if stats["saturated_fraction"] > t.max_saturated_fraction:
        problems.append(f"{stats['saturated_fraction']:.2e} of elements clipped at +-448 * scale")
    if stats["lost_blocks"] > t.max_lost_blocks:
        problems.append(f"{stats['lost_blocks']} non-zero blocks stored as zeros")
    if prep == FROM_UE8M0 and stats["max_abs_err"] != 0:
        problems.append(f"UE8M0 re-layout must be lossless, max abs error {stats['max_abs_err']:.3g}")
    return tuple(problems)


def first_difference(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    """None when the bytes are identical, else which elements differ."""
    e = expected.contiguous().reshape(-1)
    a = actual.contiguous().reshape(-1)
    if e.dtype != a.dtype or e.numel() != a.numel():
        return f"stored as {a.dtype} x{a.numel()}, expected {e.dtype} x{e.numel()}"
    eb, ab = e.view(torch.uint8), a.view(torch.uint8)
    if _same_bytes(eb, ab):
        return None
    diff = (eb != ab).reshape(e.numel(), -1).any(dim=1)
    count, first = int(diff.sum()), int(diff.nonzero()[0])
    index, rest = [], first
    for dim in reversed(expected.shape):
        index.append(rest % dim)
        rest //= dim
    return (f"{count} of {e.numel()} elements differ; first at {list(reversed(index))}: "
            f"expected {_show(e[first])}, found {_show(a[first])}")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal contiguous uint8 tensors of one size: memcmp on the CPU (torch.equal compares element
    by element, a tenth of the speed: a tenth of verify's time went there), torch.equal elsewhere."""
    if a.device.type == b.device.type == "cpu" and a.numel():
        try:
            return libc().memcmp(a.data_ptr(), b.data_ptr(), a.numel()) == 0
        except (OSError, AttributeError):
            pass
    return torch.equal(a, b)


def _show(v: torch.Tensor) -> str:
    raw = v.reshape(1).view(torch.uint8)
    hexes = "".join(f"{b:02x}" for b in raw.tolist()[::-1])
    if v.dtype.is_floating_point:
        return f"{float(v.float()):.6g} (0x{hexes})"
    return f"{v.item()} (0x{hexes})"


class JobChecker:
    """Checks jobs against DST; one instance shared by the workers (it holds no job state)."""

    def __init__(self, plan: ConversionPlan, view: CanonicalView, dest: Destination, thresholds: Thresholds):
        self.plan, self.view, self.dest, self.t = plan, view, dest, thresholds
        self.recipe: Recipe = plan.recipe
        self.by_weight = {op.weight: j for j in plan.jobs for op in j.operands}

    def checkable(self, job: Job) -> bool:
        """Outputs all present with the planned dtype and shape (anything else is a coverage failure)."""
        for t in job.outputs:
            info = self.dest.tensors.get(t.name)
            if info is None or (info.dtype, info.shape) != (t.dtype, t.shape):
                return False
        return True

    def check(self, job: Job, device: torch.device) -> tuple[list[Failure], list[TensorNumerics]]:
        try:
            return self._check(job, device)
        except Exception as e:  # noqa: BLE001 - a failed check, reported with the tensor, never a traceback
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            return [Failure(BYTES, job.outputs[0].name, f"could not re-derive it from the source: {msg}")], []

    def _check(self, job: Job, device: torch.device) -> tuple[list[Failure], list[TensorNumerics]]:
        where = torch.device("cpu") if job.action == COPY else device
        inputs = {n: self.view.load(n, where) for n in job.inputs}
        expected = run_job(job, inputs.__getitem__, self.recipe)
        actual = {t.name: read_tensor(self.dest.tensors[t.name]).to(where) for t in job.outputs}
        failures = []
        for name, tensor in expected.items():
            diff = first_difference(tensor, actual[name])
            if diff:
                failures.append(Failure(BYTES, name, diff + self._hint(job, name, actual[name], device),
                                        str(self.dest.tensors[name].file)))
        if job.action not in (MXFP8, TRTLLM_W13, TRTLLM_W2):
            return failures, []
        canonical = self._canonical(job, actual, failures)
        numerics = []
        for op, stored_as, (q, s) in canonical:
            numerics.append(self._numerics(op, stored_as, q, s, inputs.__getitem__))
        failures += [Failure(NUMERICS, n.name, "; ".join(n.problems)) for n in numerics if n.problems]
        return failures, numerics

    def _canonical(self, job: Job, actual: dict, failures: list[Failure]):
        """(operand, DST tensor name, (q, s) in canonical layout) for each quantized operand."""
        names = [t.name for t in job.outputs]
        if job.action == MXFP8:
            return [(job.operands[0], names[0], (actual[names[0]], actual[names[1]]))]
        from converter.numerics.trtllm_layout import unpack_w2, unpack_w13

        try:
            if job.action == TRTLLM_W13:
                gq, gs, uq, us = unpack_w13(actual[names[0]], actual[names[1]])
                return [(job.operands[0], names[0], (gq, gs)), (job.operands[1], names[0], (uq, us))]
            return [(job.operands[0], names[0], unpack_w2(actual[names[0]], actual[names[1]]))]
        except Exception as e:  # noqa: BLE001
            failures.append(Failure(BYTES, names[0], f"cannot un-shuffle: {getattr(e, 'message', e)}"))
            return []

    def _numerics(self, op: Operand, stored_as: str, q: torch.Tensor, s: torch.Tensor, load) -> TensorNumerics:
        x = load(op.weight)
        if op.scale:
            x = dequantize_fp8_block(x, load(op.scale))
        stats = error_stats(x, q, s)
        layer, module = layer_and_module(op.weight)
        return TensorNumerics(op.weight, stored_as, layer, module, tuple(x.shape), op.prep, **stats,
                              problems=judge(stats, op.prep, self.t, self.recipe.allow_nonfinite))

    def _hint(self, job: Job, name: str, actual: torch.Tensor, device: torch.device) -> str:
        """Say what the wrong bytes are, where that is cheap to tell (swapped gate/up, reordered rows)."""
        try:
            if job.action == MXFP8:
                return self._sibling_hint(job, name, actual, device)
            if job.action in (TRTLLM_W13, TRTLLM_W2):
                return self._shuffle_hint(job, name, actual)
        except Exception:  # noqa: BLE001 - a hint is optional
            pass
        return ""

    def _sibling_hint(self, job: Job, name: str, actual: torch.Tensor, device: torch.device) -> str:
        parts = job.operands[0].weight.split(".")
        if len(parts) < 2 or parts[-2] not in _SIBLINGS:
            return ""
        sibling = ".".join(parts[:-2] + [_SIBLINGS[parts[-2]], parts[-1]])
        other = self.by_weight.get(sibling)
        if other is None or other.action != MXFP8:
            return ""
        inputs = {n: self.view.load(n, device) for n in other.inputs}
        theirs = run_job(other, inputs.__getitem__, self.recipe)
        twin = name.replace(parts[-2], _SIBLINGS[parts[-2]])
        if twin in theirs and first_difference(theirs[twin], actual) is None:
            return f"; it holds the bytes of {twin} (gate and up swapped)"
        return ""

    def _shuffle_hint(self, job: Job, name: str, actual: torch.Tensor) -> str:
        if not name.endswith(("w13_weight", "w2_weight")):
            return ""
        inputs = {n: self.view.load(n, actual.device) for n in job.inputs}
        expected = run_job(job, inputs.__getitem__, self.recipe)[name].cpu()
        actual = actual.cpu()

        def rows(t: torch.Tensor) -> list[bytes]:
            return sorted(bytes(r) for r in t.view(torch.uint8).numpy())

        if rows(expected) != rows(actual):
            return ""
        if job.action == TRTLLM_W13:
            from converter.numerics.trtllm_layout import unpack_w13

            dummy = torch.zeros(expected.shape[0], expected.shape[1] // MX_BLOCK, dtype=torch.uint8)
            gate, _, up, _ = unpack_w13(actual, dummy)
            want_gate, _, want_up, _ = unpack_w13(expected, dummy)
            if first_difference(gate, want_up) is None and first_difference(up, want_gate) is None:
                return "; un-shuffled, gate and up are swapped (gemm1 must hold [up; gate])"
        return "; the same rows in another order: wrong row shuffle or gate/up interleave"


def check_jobs(plan: ConversionPlan, view: CanonicalView, dest: Destination, devices: list[torch.device],
               thresholds: Thresholds, progress: Callable[[int], None]
               ) -> tuple[list[Failure], list[TensorNumerics], int, int]:
    """(failures, per-tensor numerics, jobs checked, jobs skipped); jobs in DST shard order, spread
    over one worker per device slot (one output shard may hold the whole checkpoint)."""
    checker = JobChecker(plan, view, dest, thresholds)
    jobs: list[Job] = []
    skipped = 0
    for job in plan.jobs:
        if checker.checkable(job):
            jobs.append(job)
        else:
            skipped += 1
    jobs.sort(key=lambda j: dest.tensors[j.outputs[0].name].file.name)  # stable: plan order within a shard
    slots: queue.SimpleQueue = queue.SimpleQueue()
    for dev in devices:
        slots.put(dev)

    def run_one(job: Job) -> tuple[list[Failure], list[TensorNumerics]]:
        dev = slots.get()
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            result = checker.check(job, dev)
            progress(job.input_bytes)
            return result
        finally:
            slots.put(dev)

    workers = max(1, min(len(devices), len(jobs)))
    if workers == 1:
        results = [run_one(j) for j in jobs]
    else:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mxconv-verify")
        try:
            results = list(pool.map(run_one, jobs))
        finally:  # Ctrl-C: drop the queued jobs and return now, not after the running ones
            pool.shutdown(wait=False, cancel_futures=True)
    failures = [f for r in results for f in r[0]]
    numerics = sorted((n for r in results for n in r[1]), key=lambda n: natural_key(n.name))
    return failures, numerics, len(jobs), skipped

