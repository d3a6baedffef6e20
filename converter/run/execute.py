"""Executing a plan as a pipeline over row pieces of jobs (not over shards), so one big output
shard, or one big tensor, still uses every worker:

    reader --(pieces loaded into pooled buffers, bounded by bytes in flight)--> N workers
        --(outputs)--> writer (O_DIRECT, at planned offsets, any order) --> shard finisher

torch ops, file reads and writes and sha256 all release the GIL, so on a 2-core machine the
reader, the workers, the writer and the source hasher keep both cores busy. Shards are finished
(fsync + atomic rename) strictly in plan order, so an interrupted run leaves a prefix of finished
shards, as a sequential one would. With --device cuda each worker owns a stream on its GPU:
inputs are read into pinned host memory, copied in and out without blocking, and the worker
waits only for its own stream.
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from converter.errors import MxconvError, NumericsError
from converter.files import STATE_DIR
from converter.plan.planner import ShardPlan
from converter.plan.recipe import Recipe
from converter.plan.view import CanonicalView
from converter.run.pieces import BufferPool, Piece, compute, load, split
from converter.run.writer import ShardWriter

# Source bytes read ahead of the workers, per worker (a piece bigger than that runs alone): two
# pieces each keep the workers fed; more only costs memory (and page faults to fill it).
_INFLIGHT_PER_WORKER = 32 * 1024 * 1024
_MIN_INFLIGHT = 128 * 1024 * 1024
# ...and at most this much whatever the worker count: beyond a few workers the disk is the limit,
# and memory must not grow with cores (32 workers held 3.3 GB with 32 MB each and a 4x pool).
_MAX_INFLIGHT = 384 * 1024 * 1024


class Cancelled(Exception):
    """Another thread failed; this one stops at the next job boundary."""


def resolve_devices(device: str, workers: int | None) -> list[torch.device]:
    """One compute device per worker. `cuda` uses every visible GPU (at least one worker each).
    workers None: one per CPU core, or two per GPU (one computes while the other's copies run)."""
    dev = torch.device(device)
    if workers is None:
        gpus = torch.cuda.device_count() if dev.type == "cuda" and dev.index is None else 1
        workers = 2 * gpus if dev.type == "cuda" else max(1, len(os.sched_getaffinity(0)))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MxconvError(f"--device {device} asked for, but no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is not None:
            if dev.index >= count:
                raise MxconvError(f"--device {device}: only {count} CUDA device(s) visible")
            return [dev] * workers
        return [torch.device("cuda", i % count) for i in range(max(workers, count))]
    if dev.type != "cpu":
        raise MxconvError(f"unsupported --device {device!r}; use cpu, cuda or cuda:N")
    return [dev] * workers


class _Budget:
    """Bytes of loaded-but-unfinished jobs; a job that alone exceeds the limit runs by itself."""

    def __init__(self, limit: int, cancel: threading.Event):
        self.limit, self.used, self.cancel = limit, 0, cancel
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit and not self.cancel.is_set():
                self.cond.wait()
            if self.cancel.is_set():
                raise Cancelled()
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


@contextmanager
def _intra_op_threads(devices: list[torch.device]):
    """Workers parallelize over jobs; torch's own thread pool on top of that would oversubscribe
    the cores (N workers x N OpenMP threads busy-waiting), so it gets the cores left over."""
    before = torch.get_num_threads()
    cpu_workers = sum(d.type == "cpu" for d in devices)
    if cpu_workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cpu_workers // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(shards: list[ShardPlan], view: CanonicalView, dst: Path, recipe: Recipe, devices: list[torch.device],
            progress: Callable[[int], None], reading: Callable[[Path], None] = lambda path: None,
            partial_tag: str = "") -> None:
    """Run every shard; the first error cancels the rest and is raised as is. Shards finished
    before the error stay finished (a rerun resumes after them); the others leave nothing.
    `reading(file)` is told of each source file before its first read (the source hasher's cue).
    `partial_tag` goes into the temporary file names, so that two processes writing the same
    shard (a cluster task retried while a lost node still runs it) never share one."""
    if not shards:
        return
    pieces = [p for i, shard in enumerate(shards) for job in shard.jobs for p in split(i, job, view, recipe)]
    cancel = threading.Event()
    errors: list[BaseException] = []
    inflight = min(_MAX_INFLIGHT, max(_MIN_INFLIGHT, _INFLIGHT_PER_WORKER * len(devices)))
    budget = _Budget(inflight, cancel)
    pool = BufferPool(pin=any(d.type == "cuda" for d in devices), limit=2 * inflight)  # inputs and outputs in flight
    ready: queue.Queue = queue.Queue()  # loaded pieces, for the workers
    computed: queue.Queue = queue.Queue()  # outputs, for the writer
    done_shards: queue.Queue = queue.Queue()  # shards whose every piece is written, for the finisher
    writers: list[ShardWriter | None] = [None] * len(shards)
    remaining = [0] * len(shards)
    for p in pieces:
        remaining[p.shard] += 1
    finished = [False] * len(shards)
    lock = threading.Lock()

    def fail(e: BaseException) -> None:
        with lock:
            if not isinstance(e, Cancelled):
                errors.append(e)
        cancel.set()
        budget.wake()

    def reader() -> None:
        seen: set[Path] = set()
        try:
            for p in pieces:
                budget.acquire(p.input_bytes)
                for name in p.job.inputs:
                    if (file := view.tensors[name].file) not in seen:
                        seen.add(file)
                        reading(file)
                if writers[p.shard] is None:
                    shard = shards[p.shard]
                    w = ShardWriter(dst / shard.name, dst / STATE_DIR / f"{shard.name}{partial_tag}.partial", shard.tensors)
                    writers[p.shard] = w.__enter__()
                bufs: list = []
                ready.put((p, load(p, view, pool, writers[p.shard], bufs), bufs))
        except BaseException as e:
            fail(e)
        finally:
            for _ in devices:
                ready.put(None)

    def run(p: Piece, inputs: dict, device: torch.device, stream, bufs: list) -> dict:
        try:
            return compute(p, inputs, recipe, device, stream, pool, writers[p.shard], bufs)
        except NumericsError as e:
            if p.rows is not None:  # report it as the whole tensor does (block indices, counts)
                whole = Piece(p.shard, p.job, None, p.job.input_bytes)
                extra: list = []
                compute(whole, load(whole, view, pool, writers[p.shard], extra), recipe, device, stream, pool,
                        writers[p.shard], extra)
            raise e

    def worker(device: torch.device) -> None:
        stream = None
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
        except BaseException as e:  # no device: fail the run (cancel frees the reader), then drain
            fail(e)
        while (item := ready.get()) is not None:
            if cancel.is_set():
                continue  # drain: the reader stops at its next piece
            p, inputs, bufs = item
            try:
                try:
                    outputs = run(p, inputs, device, stream, bufs)
                except MxconvError as e:  # numerics name the tensor; add the file it came from
                    raise e.in_file((view.tensors.get(e.tensor) or view.tensors[p.job.inputs[0]]).file)
                computed.put((p, outputs, bufs))
            except BaseException as e:
                fail(e)

    def writer() -> None:
        # Separate from the workers: an O_DIRECT write waits for the disk, a worker should not.
        while (item := computed.get()) is not None:
            if cancel.is_set():
                continue
            p, outputs, bufs = item
            try:
                for name, tensor in outputs.items():
                    if p.rows is None:
                        writers[p.shard].write(name, tensor)
                    else:
                        writers[p.shard].write_rows(name, p.output_row, tensor)
                del outputs
                pool.give(bufs)
                budget.release(p.input_bytes)
                progress(p.input_bytes)
                remaining[p.shard] -= 1
                if remaining[p.shard] == 0:
                    done_shards.put(p.shard)
            except BaseException as e:
                fail(e)

    def finisher() -> None:
        complete: set[int] = set()
        nxt = 0
        while nxt < len(shards):
            i = done_shards.get()
            if i is None:
                return
            complete.add(i)
            while nxt in complete and not cancel.is_set():  # in plan order
                try:
                    writers[nxt].finish()
                    finished[nxt] = True
                    writers[nxt] = None  # its buffers (O_DIRECT bounce, edge blocks) go now, not at the end
                except BaseException as e:
                    fail(e)
                    return
                nxt += 1

    producers = [threading.Thread(target=reader, name="mxconv-read", daemon=True)]
    producers += [threading.Thread(target=worker, args=(d,), name=f"mxconv-work-{n}", daemon=True)
                  for n, d in enumerate(devices)]
    consumers = [threading.Thread(target=writer, name="mxconv-write", daemon=True),
                 threading.Thread(target=finisher, name="mxconv-finish", daemon=True)]
    with _intra_op_threads(devices):
        for t in producers + consumers:
            t.start()
        try:
            for t in producers:
                t.join()
        except BaseException as e:  # KeyboardInterrupt in the main thread: stop the others first
            fail(e)
            for t in producers:
                t.join()
            raise
        finally:
            computed.put(None)
            consumers[0].join()
            done_shards.put(None)  # lets the finisher stop if a shard never completed
            consumers[1].join()
            for i, w in enumerate(writers):
                if w is not None and not finished[i]:
                    w.abort()
    if errors:
        raise errors[0]
    if not all(finished):  # cannot happen without an error; never report success for it
        raise MxconvError("internal error: a shard was not finished")
