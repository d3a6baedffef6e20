"""Executing a plan as a pipeline over row pieces of jobs (not over shards), so one big output
shard, or one big tensor, still uses every worker:

    R readers --(pieces loaded into pooled buffers or mapped, bounded by bytes in flight)--> N workers
        --(outputs)--> R writers (at planned offsets, any order) --> shard finisher

Readers take pieces from several shards at once (see `interleave`: about one shard per two
writers) and read them with positional reads, in parallel, or map them from the page cache
(`pieces.load`; a worker checks that their files are still whole just before it reads them,
`check_mapped`); writers write at the offsets the plan gives every output byte, in parallel
(O_DIRECT on disks; a file written with write(2) takes one write at a time, so its writers take
turns, `writer.Turns`). R is the worker count on CPU (so
`--workers` is the number of cores used) and at least the core count with accelerators (there
the CPU only moves bytes). One reader and one writer thread were a serial ceiling of about
1.5-2 GB/s on a 16-core machine, whatever the worker count.

On tmpfs, every output page is allocated as it is written: write(2) does that for 0.36-0.41
CPU-s per GB, a shared mapping filled in place for 0.7-0.77 (a page fault per 4 KB; 2-core EPYC
VM), but write(2)s to one file take turns on its lock. So several shards are written at once with
write(2), and only a run that writes one shard at a time with at least 4 writers maps it
(MXCONV_MAPPED_WRITES=1 maps always, 0 never: read here only; see ShardWriter). Where a shard is
written with write(2) and the CPU workers are as many as the process's cores (`workers_write`),
a worker writes an MXFP8 job's e4m3 bytes itself, a cache-sized band at a time as its kernel
makes them (`pieces.streamed`), and hands the writers only the scales: the bytes no longer go to
memory and back between the kernel and write(2).

torch ops, file reads and writes and sha256 all release the GIL, so on a 2-core machine the
readers, the workers, the writers and the source hasher keep both cores busy. Taking it back
costs a context switch, though, and at 16 workers those hand-offs left half the cores idle: with
8 or more workers, several processes each run this executor on their share of the shards
(`processes.py`). Shards are finished
(fsync + atomic rename) strictly in plan order, so an interrupted run leaves a prefix of finished
shards, as a sequential one would (the shards open at that moment are redone by a rerun). With
--device cuda each GPU worker owns a stream on its GPU, copies in and out on it, and waits only
for its own stream; host buffers are pinned only where GPU workers alone compute (see `devices.pinned`).
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from converter.errors import MxconvError, NumericsError, OutputError
from converter.files import STATE_DIR
from converter.plan.planner import ShardPlan
from converter.plan.recipe import Recipe
from converter.plan.view import CanonicalView
from converter.run.devices import cores, intra_op_threads, io_threads, pinned
from converter.run.pieces import (PIECE_BYTES, BufferPool, Piece, check_mapped, compute, interleave, load,
                                  mapped_outputs, split)
from converter.run.writer import ShardWriter, Turns

# Source bytes read ahead of the workers, per worker (a piece bigger than that runs alone): two
# pieces each keep the workers fed; more only costs memory (and page faults to fill it). In pieces
# of the size set at import (16 MB: 32 MB per worker, at least 128 MB, at most 384 MB), so that
# MXCONV_PIECE_MB changes the piece size, not how many pieces are in flight.
_INFLIGHT_PER_WORKER = 2 * PIECE_BYTES
_MIN_INFLIGHT = 8 * PIECE_BYTES
# ...and at most this much whatever the worker count: beyond a few workers the disk is the limit,
# and memory must not grow with cores (32 workers held 3.3 GB with 32 MB each and a 4x pool).
_MAX_INFLIGHT = 24 * PIECE_BYTES


class Cancelled(Exception):
    """Another thread failed; this one stops at the next job boundary."""


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
def _collector_frozen():
    """The objects alive now (torch's modules, the plan) outlive the run: out of the cyclic
    collector's sight, its full collections (set off by the pieces' small objects) no longer walk
    them each time (4 % of a conversion's CPU on a 2-core VM). Given back afterwards, unless
    something had frozen objects before (freezing does not nest: unfreezing would release those
    too)."""
    ours = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


def shard_window(shards: int, writers: int) -> int:
    """Output shards written at once: one per two writer threads (at least 2), as many as there are
    (MXCONV_SHARD_WINDOW=N sets N instead: read here only, for benchmarks)."""
    env = os.environ.get("MXCONV_SHARD_WINDOW")
    return max(1, min(shards, int(env) if env else max(2, writers // 2)))


def workers_write(devices: list[torch.device]) -> bool:
    """Whether CPU workers write their MXFP8 bytes themselves as they make them (`pieces.streamed`,
    where a shard is written with write(2)): where they are as many as this process's cores, so
    that the writer threads' own core time would come out of theirs anyway. With fewer (one
    worker on a 2-core VM), a writer thread copying one piece while the worker converts the next
    is parallel work, and a BF16 conversion took 1.4 s that way against 2.0 s streamed."""
    return sum(d.type == "cpu" for d in devices) >= cores()


def _mapping(window: int, writers: int) -> bool | None:
    """ShardWriter's `mapped`: None (map where the file system is in memory) or False (write(2))."""
    env = os.environ.get("MXCONV_MAPPED_WRITES")
    if env is not None:
        return False if env == "0" else None
    return None if window == 1 and writers >= 4 else False


@contextmanager
def _interrupts_held():
    """SIGINT held pending (not lost) while the pipeline's threads start, so that a Ctrl-C never
    lands inside a `Thread.start()` whose thread then runs on unjoined; it is taken as soon as
    they have all started. The threads inherit the mask: the main thread takes every Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _despite_interrupts(step: Callable[[], None], cancel: Callable[[BaseException], None]
                        ) -> KeyboardInterrupt | None:
    """Run `step` (idempotent) to its end even if Ctrl-C lands in it: the run is cancelled and the
    step run again. A Ctrl-C while the writers finished used to skip the rest of the clean-up and
    leave a shard's temporary file behind. Returns the interrupt, if one came."""
    caught = None
    while True:
        try:
            step()
            return caught
        except KeyboardInterrupt as e:
            caught = caught or e
            cancel(e)


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
    per_shard = [[p for job in shard.jobs for p in split(i, job, view, recipe)] for i, shard in enumerate(shards)]
    cancel = threading.Event()
    errors: list[BaseException] = []
    readers = io_threads(devices)
    writes = workers_write(devices)
    window = shard_window(len(shards), readers)
    mapped = _mapping(window, readers)
    inflight = min(_MAX_INFLIGHT, max(_MIN_INFLIGHT, _INFLIGHT_PER_WORKER * max(len(devices), readers)))
    budget = _Budget(inflight, cancel)
    pool = BufferPool(pin=pinned(devices), limit=2 * inflight)  # inputs and outputs in flight
    ready: queue.Queue = queue.Queue()  # loaded pieces, for the workers
    computed: queue.Queue = queue.Queue()  # outputs, for the writers
    done_shards: queue.Queue = queue.Queue()  # shards whose every piece is written, for the finisher
    writers: list[ShardWriter | None] = [None] * len(shards)
    turns = [Turns() for _ in shards]
    remaining = [len(ps) for ps in per_shard]
    finished = [False] * len(shards)
    lock = threading.Lock()
    todo = interleave(per_shard, window)  # handed to the readers, `window` shards at a time
    seen: set[Path] = set()
    live_readers = [readers]

    def fail(e: BaseException) -> None:
        with lock:
            if not isinstance(e, Cancelled):
                errors.append(e)
        cancel.set()
        budget.wake()

    def shard_writer(i: int) -> ShardWriter:
        with lock:  # opened by the first reader to need it (the file is created at its full size)
            if writers[i] is None and not cancel.is_set():
                shard = shards[i]
                w = ShardWriter(dst / shard.name, dst / STATE_DIR / f"{shard.name}{partial_tag}.partial",
                                shard.tensors, mapped=mapped)
                writers[i] = w.__enter__()
            if writers[i] is None:
                raise Cancelled()
            return writers[i]

    def reader() -> None:
        try:
            while not cancel.is_set():
                with lock:
                    p = next(todo, None)
                    first = p is not None and (p.rows is None or p.rows[0] == 0)  # a job's pieces share its files
                    files = list(dict.fromkeys(f for name in (p.job.inputs if first else ())
                                               for f in view.source_files(name) if f not in seen))
                    seen.update(files)
                if p is None:
                    break
                budget.acquire(p.input_bytes)
                for file in files:
                    reading(file)
                w = shard_writer(p.shard)
                bufs: list = []
                mapped: list = []
                ready.put((p, load(p, view, pool, w, bufs, mapped), bufs, mapped))
        except BaseException as e:
            fail(e)
        finally:
            with lock:
                live_readers[0] -= 1
                last = live_readers[0] == 0
            if last:
                for _ in devices:
                    ready.put(None)

    def run(p: Piece, inputs: dict, device: torch.device, stream, bufs: list) -> dict:
        try:
            return compute(p, inputs, recipe, device, stream, pool, writers[p.shard], bufs, writes=writes)
        except NumericsError as e:
            if p.rows is not None:  # report it as the whole tensor does (block indices, counts)
                whole = Piece(p.shard, p.job, None, p.job.input_bytes)
                extra: list = []
                extra_mapped: list = []
                inputs = load(whole, view, pool, writers[p.shard], extra, extra_mapped)
                check_mapped(extra_mapped)
                compute(whole, inputs, recipe, device, stream, pool, writers[p.shard], extra, in_place=False)
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
            p, inputs, bufs, mapped = item
            try:
                try:
                    check_mapped(mapped)
                    outputs = run(p, inputs, device, stream, bufs)
                except MxconvError as e:  # numerics name the tensor; add the file it came from
                    raise e.in_file((view.tensors.get(e.tensor) or view.tensors[p.job.inputs[0]]).file)
                computed.put((p, outputs, bufs, mapped_outputs(mapped, outputs)))
            except BaseException as e:
                fail(e)

    def write(item: tuple) -> None:
        p, outputs, bufs, mapped = item  # `mapped`: the mapped inputs that are outputs too
        try:
            check_mapped(mapped)
            try:
                for name, tensor in outputs.items():
                    if p.rows is None:
                        writers[p.shard].write(name, tensor)
                    else:
                        writers[p.shard].write_rows(name, p.output_row, tensor)
            except OutputError:  # EFAULT from write(2): a mapped source cut short under it
                check_mapped(mapped)
                raise
            del outputs, mapped
            pool.give(bufs)
            budget.release(p.input_bytes)
            with lock:
                progress(p.input_bytes)
                remaining[p.shard] -= 1
                last = remaining[p.shard] == 0
            if last:
                done_shards.put(p.shard)
        except BaseException as e:
            fail(e)

    def writer() -> None:
        # Separate from the workers: an O_DIRECT write waits for the disk, a worker should not.
        # (Where the shard is mapped, outputs filled in place only need recording here.)
        while (item := computed.get()) is not None:
            w = writers[item[0].shard]
            mine = turns[item[0].shard].mine(item) if w is not None and w.one_at_a_time else iter((item,))
            item = None  # an output is held only until it is written, not while others are
            for got in mine:
                if cancel.is_set():
                    break
                write(got)
                got = None
            mine = None  # a generator left at a yield lets go of the shard now

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

    producers = [threading.Thread(target=reader, name=f"mxconv-read-{n}", daemon=True) for n in range(readers)]
    producers += [threading.Thread(target=worker, args=(d,), name=f"mxconv-work-{n}", daemon=True)
                  for n, d in enumerate(devices)]
    consumers = [threading.Thread(target=writer, name=f"mxconv-write-{n}", daemon=True) for n in range(readers)]
    consumers.append(threading.Thread(target=finisher, name="mxconv-finish", daemon=True))
    def join(group: list[threading.Thread]) -> None:
        for t in group:
            if t.ident is not None:  # started (a Ctrl-C may have come before start() returned)
                t.join()

    def stop_writers() -> None:
        for _ in consumers[:-1]:
            computed.put(None)
        join(consumers[:-1])
        done_shards.put(None)  # lets the finisher stop if a shard never completed
        join(consumers[-1:])

    def abort_unfinished() -> None:
        for i, w in enumerate(writers):
            if w is not None and not finished[i]:
                w.abort()

    with intra_op_threads(devices), _collector_frozen():
        try:  # started inside: Ctrl-C while they start must still stop them and remove their files
            with _interrupts_held():
                for t in producers + consumers:
                    t.start()
            join(producers)
        except BaseException as e:  # KeyboardInterrupt in the main thread: stop the others first
            fail(e)
            for _ in devices:  # workers whose readers never started (a start that failed) stop too
                ready.put(None)
            _despite_interrupts(lambda: join(producers), fail)
            raise
        finally:
            late = _despite_interrupts(stop_writers, fail)
            late = _despite_interrupts(abort_unfinished, fail) or late
        if late is not None:  # Ctrl-C while the last pieces were being written: the run is cancelled
            raise late
    if errors:
        raise errors[0]
    if not all(finished):  # cannot happen without an error; never report success for it
        raise MxconvError("internal error: a shard was not finished")
