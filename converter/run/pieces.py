"""Jobs cut into row pieces, and the host buffers they run in.

Why pieces: every numeric step of a job is independent across rows (1x32 blocks lie in one row,
an FP8 source's 128x128 tiles in one band of 128 rows), so a 264 MB dense projection or a 1.9 GB
embedding need not be in memory at once. Pieces of about 16 MB keep memory flat whatever the
tensor and shard sizes, let two workers share one big tensor, and make buffer sizes repeat, so
the buffers are reused instead of freshly faulted in (see BufferPool).

Only jobs read straight from source files are cut (a name mapping that splits or fuses source
tensors materializes whole tensors), and not under --allow-nonfinite, whose warning counts
blocks per tensor. A numerics error in a piece is reported as the whole tensor reports it.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import threading
from collections.abc import Iterator

import torch

from converter.errors import OutputError, SourceError
from converter.numerics.reference import ScaleZeroBlocks
from converter.numerics.streamed import quantize_bf16_to_file, requantize_fp8_to_file
from converter.plan.planner import (COPY, DEQUANT_BF16, FROM_FP8, FROM_HIGH_PRECISION, MXFP8, TRTLLM_W2,
                                    TRTLLM_W13, Job)
from converter.plan.recipe import Recipe
from converter.plan.view import CanonicalView
from converter.run.direct_io import ALIGN
from converter.run.transform import run_job
from converter.run.writer import ShardWriter
from converter.sources import checkpoint
from converter.sources.safetensors import DTYPES, PlannedTensor, mapping_intact

# source bytes per piece (MXCONV_PIECE_MB overrides it: read here only, for benchmarks)
PIECE_BYTES = int(float(os.environ.get("MXCONV_PIECE_MB") or 16) * (1 << 20))
_TILE = 128  # rows of an FP8 source's scale tile: pieces of FP8 weights start on these
_FILLS_OUT = (MXFP8, DEQUANT_BF16)  # job actions that write into preallocated output buffers
# e4m3 bytes a worker makes before it writes them itself, where the shard is written with write(2)
# (`streamed`): small enough to stay in the core's cache (2 MB of L2 per core on the 16-core VM).
# MXCONV_STREAMED_WRITES=0 turns that off (read here only, for benchmarks).
BAND_BYTES = 1 << 20
_STREAMED = os.environ.get("MXCONV_STREAMED_WRITES", "1") != "0"
_band = threading.local()


@dataclasses.dataclass(frozen=True)
class Piece:
    shard: int  # index into the shard list being executed
    job: Job
    rows: tuple[int, int] | None  # of the job's tensors; None: the whole job
    input_bytes: int

    @property
    def output_row(self) -> int:
        """First row of the job's outputs this piece fills: gemm1 of the TRT-LLM layout holds two
        rows (up, gate) per source row, interleaved, so its pieces land at twice the source row."""
        r0 = self.rows[0] if self.rows else 0
        return 2 * r0 if self.job.action == TRTLLM_W13 else r0


def split(shard: int, job: Job, view: CanonicalView, recipe: Recipe) -> list[Piece]:
    """The job as pieces of about PIECE_BYTES (one piece if it is small or cannot be cut)."""
    whole = [Piece(shard, job, None, job.input_bytes)]
    if view.derivations is not None or job.input_bytes <= PIECE_BYTES * 3 // 2:
        return whole
    if job.action == COPY:
        step = 1
    elif job.action in (MXFP8, DEQUANT_BF16) and not recipe.allow_nonfinite:
        step = 1 if job.operands[0].prep == FROM_HIGH_PRECISION and job.action == MXFP8 else _TILE
    elif job.action in (TRTLLM_W13, TRTLLM_W2) and not recipe.allow_nonfinite:
        # The row shuffle stays inside 32-row blocks and the scale swizzle inside 128-row tiles, so
        # 128-row bands of the source map onto bands of the packed output (twice as tall for w13).
        step = _TILE
    else:
        return whole
    first = view.tensors[job.operands[0].weight]
    if len(first.shape) < 2 or first.shape[0] < 2 * step:
        return whole
    rows = first.shape[0]
    # every input of the job (gate and up for w13, the FP8 scales) is cut at the same rows
    per = max(step, PIECE_BYTES // max(1, job.input_bytes // rows) // step * step)
    starts = list(range(0, rows, per))
    share = [job.input_bytes * (min(rows, r + per) - r) // rows for r in starts]
    share[-1] += job.input_bytes - sum(share)  # the pieces' bytes add up to the job's exactly
    return [Piece(shard, job, (r, min(rows, r + per)), b) for r, b in zip(starts, share)]


def interleave(per_shard: list[list[Piece]], window: int) -> Iterator[Piece]:
    """Every shard's pieces, in order within each shard, from `window` shards at a time: the next
    piece comes from the open shard with the fewest bytes handed out since it opened (ties: the
    older shard), and the next shard opens when one runs out, level with the least advanced open
    shard (opened at 0 it would take every piece until it caught up, and the writes would take
    turns on one file again). Why: write(2) to one file takes turns on the file's lock (on tmpfs,
    one core's copy rate, about 2.7 GB/s); several files at once write in parallel, as a parallel
    copy does. Shards are still finished (renamed into place) in plan order."""
    open_: list[tuple[int, int]] = []  # (bytes handed out, counted from the level it opened at; shard): a heap
    taken = [0] * len(per_shard)
    upcoming = iter(range(len(per_shard)))
    while True:
        while len(open_) < max(1, window):
            i = next(upcoming, None)
            if i is None:
                break
            if per_shard[i]:
                heapq.heappush(open_, (open_[0][0] if open_ else 0, i))
        if not open_:
            return
        given, i = heapq.heappop(open_)
        piece = per_shard[i][taken[i]]
        taken[i] += 1
        if taken[i] < len(per_shard[i]):
            heapq.heappush(open_, (given + piece.input_bytes, i))
        yield piece


class BufferPool:
    """Host buffers reused across pieces, best fit by size.

    Fresh memory costs a page fault and a zeroed page per 4 KB (in a VM sometimes a fault on the
    host too); passing every tensor of a checkpoint through fresh buffers cost more system time
    than the numerics. Each buffer has 4 KB to spare, so the tensor in it can start at the
    address phase that lets an O_DIRECT write take it without a copy. Pinned where asked
    (`devices.pinned`: GPU workers alone)."""

    def __init__(self, pin: bool, limit: int):
        self.pin, self.limit, self.cached = pin, limit, 0
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int, phase: int, bufs: list) -> torch.Tensor:
        """nbytes of memory starting at an address == phase (mod ALIGN); its buffer joins `bufs`."""
        size = nbytes + ALIGN
        base = None
        with self.lock:
            fits = [(b.numel(), k) for k, b in enumerate(self.free) if size <= b.numel() <= 2 * size]
            if fits:
                base = self.free.pop(min(fits)[1])
                self.cached -= base.numel()
        if base is None:
            base = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        bufs.append(base)
        skip = (phase - base.data_ptr()) % ALIGN
        return base[skip:skip + nbytes]

    def give(self, bufs: list) -> None:
        with self.lock:
            for base in bufs:
                self.free.append(base)
                self.cached += base.numel()
            while self.cached > self.limit:  # drop the oldest
                self.cached -= self.free.pop(0).numel()


def _sub_rows(shape: tuple[int, ...], rows: tuple[int, int]) -> tuple[int, ...]:
    return (rows[1] - rows[0], *shape[1:])


def mapping_reads(pool: BufferPool) -> bool:
    """Whether a piece's numerics inputs may be mapped from the page cache (`checkpoint.map_tensor`)
    rather than read into pooled buffers: not where the buffers are pinned (GPU workers alone copy
    from pinned memory asynchronously), nor with MXCONV_MAPPED_READS=0."""
    return not pool.pin and os.environ.get("MXCONV_MAPPED_READS", "1") != "0"


def load(piece: Piece, view: CanonicalView, pool: BufferPool, writer: ShardWriter, bufs: list,
         mapped: list) -> dict[str, torch.Tensor]:
    """A piece's source tensors (their rows, or the matching scale tile rows) in pooled buffers,
    or mapped from the page cache where they can be (each mapped one is listed in `mapped`, with
    its mapping, for `check_mapped` just before it is read). A copied tensor is written as read:
    it is read straight into its place in a mapped output shard, or into a buffer with the phase
    of that place for O_DIRECT; written with write(2), it is written from its mapping (one copy
    of its bytes, not a read and a write)."""
    job = piece.job
    if view.derivations is not None:  # renamed, split or fused: the mapping materializes them
        return {name: view.load(name, "cpu") for name in job.inputs}
    inputs = {}
    scales = {op.scale for op in job.operands}
    for name in job.inputs:
        info = view.ckpt.tensors[name]
        if piece.rows is not None:
            r0, r1 = piece.rows
            if name in scales:  # an FP8 scale: its tile rows
                r0, r1 = r0 // _TILE, -(-r1 // _TILE)
            row_bytes = info.nbytes // info.shape[0]
            info = dataclasses.replace(info, shape=_sub_rows(info.shape, (r0, r1)), start=info.start + r0 * row_bytes,
                                       end=info.start + r1 * row_bytes)
        out = None
        if job.action == COPY:
            r0 = piece.rows[0] if piece.rows else 0
            place = writer.region(job.outputs[0].name, r0, piece.rows[1] - r0 if piece.rows else None)
            if place is not None and place.numel() == info.nbytes:
                out = place  # read straight into its place in the mapped output shard
            elif not writer.one_at_a_time:  # O_DIRECT: a buffer at its place's phase, written without a copy
                out = pool.take(info.nbytes, writer.phase(job.outputs[0].name, r0), bufs)
        if out is None:  # the numerics' inputs, and copies written with write(2): from the page cache
            tensor = checkpoint.map_tensor(info) if mapping_reads(pool) else None
            if tensor is not None:
                inputs[name] = tensor
                storage = tensor.untyped_storage()
                mapped.append((name, info.file, info.end, storage.data_ptr(), storage.nbytes()))
                continue
            out = pool.take(info.nbytes, 0, bufs)
        # through the checkpoint module, where every source read goes (and tests watch them)
        inputs[name] = checkpoint.read_tensor(info, out=out)
    return inputs


def check_mapped(mapped: list) -> None:
    """Raise the error a read would have raised if a file that tensors were mapped from has been
    cut short since (copied over, rewritten), or a page of it could not be read back: reading those
    bytes now would kill the process with SIGBUS. Called just before the numerics read them, and
    before the writer writes an output that is a mapped input, so only a file cut short (or a disk
    failing) while they do can still do that."""
    for name, file, end, address, length in mapped:
        if not mapping_intact(address, length, file, end):
            try:
                whole = os.stat(file).st_size >= end
            except OSError:
                whole = False
            if whole:
                raise SourceError("read failed: a page of its bytes could not be read (an I/O error)",
                                  file=file, tensor=name)
            raise SourceError("changed while it was being converted (it is now shorter than its header says); "
                              "rerun the same command when it no longer changes", file=file, tensor=name)


def mapped_outputs(mapped: list, outputs: dict[str, torch.Tensor]) -> list:
    """The entries of `mapped` whose mapping an output lies in (UE8M0 weights pass through the
    numerics unchanged): what the writer must check before it writes them."""
    places = {t.untyped_storage().data_ptr() for t in outputs.values()}
    return [m for m in mapped if m[3] in places]


def compute(piece: Piece, inputs: dict[str, torch.Tensor], recipe: Recipe, device: torch.device, stream,
            pool: BufferPool, writer: ShardWriter, bufs: list, in_place: bool = True,
            writes: bool = False) -> dict[str, torch.Tensor]:
    """Run a piece on `device`; outputs come back in host memory: where the job can fill them,
    in their place in the output file (a mapped one, unless not `in_place`) or in pooled buffers
    (listed in `bufs`). `writes`: a CPU worker may write its MXFP8 bytes itself (`streamed`); the
    outputs it returns are then those left for the writer."""
    job, r0 = piece.job, piece.output_row
    if device.type == "cpu" and in_place and writes:
        outputs = streamed(piece, inputs, recipe, pool, writer, bufs)
        if outputs is not None:
            return outputs
    if device.type == "cpu" or job.action == COPY:  # copies never need the accelerator
        out = None
        if job.action in _FILLS_OUT:
            out = {}
            for t in job.outputs:
                out[t.name] = _output_buffer(t, piece, pool, writer, bufs, in_place)
        return run_job(job, inputs.__getitem__, recipe, out=out)
    with torch.cuda.stream(stream):
        on_device = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        outputs = run_job(job, on_device.__getitem__, recipe)
        host = {}
        for name, t in outputs.items():
            buf = pool.take(t.numel() * t.element_size(), writer.phase(name, r0), bufs)
            host[name] = buf.view(t.dtype).view(t.shape)
            host[name].copy_(t, non_blocking=True)
        # Wait for this worker's copies only (other workers keep their GPUs busy), asleep: a
        # stream's synchronize() spins a core until the GPU is done, and with CPU workers beside
        # the GPU ones every core has pieces to convert.
        done = torch.cuda.Event(blocking=True)
        done.record(stream)
        done.synchronize()
    return host


def _output_buffer(t: PlannedTensor, piece: Piece, pool: BufferPool, writer: ShardWriter, bufs: list,
                   in_place: bool) -> torch.Tensor:
    """Where the piece's rows of planned output `t` are made: their place in a mapped shard (if
    `in_place`), or a pooled buffer at that place's phase (listed in `bufs`)."""
    r0 = piece.output_row
    shape = _sub_rows(t.shape, piece.rows) if piece.rows else t.shape
    nbytes = PlannedTensor(t.name, t.dtype, shape).nbytes
    buf = writer.region(t.name, r0, shape[0] if piece.rows else None) if in_place else None
    if buf is None or buf.numel() != nbytes:
        buf = pool.take(nbytes, writer.phase(t.name, r0), bufs)
    return buf.view(DTYPES[t.dtype]).view(shape)


def _band_buffer(nbytes: int) -> torch.Tensor:
    """This worker thread's band buffer, at least `nbytes` (one per thread: it stays in its core's cache)."""
    buf = getattr(_band, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _band.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def streamed(piece: Piece, inputs: dict[str, torch.Tensor], recipe: Recipe, pool: BufferPool,
             writer: ShardWriter, bufs: list) -> dict[str, torch.Tensor] | None:
    """An MXFP8 job (from FP8 or BF16) where its shard is written with write(2): this worker writes
    its e4m3 bytes itself, a band of rows at a time, as the kernel makes them (`numerics.streamed`,
    which says why), and returns its scales alone for the writer. None where that does not apply
    (another job or file, the kernels declining): then nothing of it counts as written yet."""
    job = piece.job
    if (not _STREAMED or job.action != MXFP8 or recipe.allow_nonfinite
            or ScaleZeroBlocks(recipe.scale_zero_blocks) is not ScaleZeroBlocks.EXACT):
        return None
    op, (data, scale) = job.operands[0], job.outputs
    weight, r0 = inputs[op.weight], piece.output_row
    wanted = {FROM_FP8: torch.float8_e4m3fn, FROM_HIGH_PRECISION: torch.bfloat16}.get(op.prep)
    if weight.dtype != wanted or weight.dim() != 2 or data.dtype != "F8_E4M3":
        return None
    n, k = weight.shape
    target = writer.stream_target(data.name, r0, n, k)
    if target is None:
        return None
    scales = _output_buffer(scale, piece, pool, writer, bufs, in_place=False)
    fd, offset, lock = target
    try:
        if op.prep == FROM_FP8:
            rows = max(_TILE, BAND_BYTES // max(1, k) // _TILE * _TILE)
            done = requantize_fp8_to_file(weight, inputs[op.scale], recipe.scale_rule, fd, offset, scales,
                                          _band_buffer(rows * k), lock)
        else:
            done = quantize_bf16_to_file(weight, recipe.scale_rule, fd, offset, scales,
                                         _band_buffer(max(1, BAND_BYTES // max(1, k)) * k), lock)
    except OSError as e:
        raise OutputError(f"write failed: {e.strerror}", file=writer.tmp_path, tensor=data.name) from e
    if not done:
        return None
    writer.record_rows(data.name, r0, n)
    return {scale.name: scales}
