"""One machine's conversion spread over several processes, each running the one-machine executor
(`execute.py`) on its share of the shards (`process_child.py` is the other side).

Why processes: one process's threads share one GIL. Every torch or C call a pipeline thread
makes releases it, and taking it back costs a context switch; at 16 workers (48 pipeline
threads) a process made about 137 of them per 16 MB piece and kept only 8 of 16 cores busy
(16-core H200 VM, BF16 source, no hash: 7.5-8.3 GB/s), while 4 processes of 4 workers each
converted about 12 GB/s on the same cores. So a run with 8 or more CPU workers (or `--device
cuda`, whose CPU helpers take the cores) gets one process per 4 workers, at most 8; MXCONV_PROCESSES
or `processes=` sets the count (1: one process, as before). The bytes do not depend on it.

The shards go to the processes in plan order, each to the process with the fewest source bytes so
far (`share`; shards of one size go in turn, shard i to process i mod P): the processes move
through the source about together (a process dealt a much heavier shard falls behind while the
others go on), as one process's readers do, so the source hasher still reads each file about
when the conversion does and an interrupted run leaves about a prefix of finished shards. Each
process finishes its shards in plan order; a rerun redoes whatever is not finished, as always.
The workers are dealt out so that each GPU's stay in one process (`deal`), and each process gets
an equal share of the cores for its reader and writer threads.

The parent shows one progress bar, hashes the source files as the processes report reading them,
and re-issues their warnings. The first error stops the others (they remove their unfinished
shards) and is raised as the process raised it; Ctrl-C is passed on and waited for; a process
that dies is reported as such. A parent killed outright closes its end of the socket pairs, and
its processes stop on their own. A caller that runs again soon in the same process (a Ray node's
next task) may `keep` the processes of a run that succeeded: they wait that long for the next
run's jobs, which then skip the start-up (about 2 s: a torch import, CUDA contexts).

The command starts its processes as it starts (`warm_up`), forked by one process that imports
once (`forked.py`), so that they are ready together while the parent plans; each job carries the
canonical view the parent planned from, so a process opens no source of its own.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import signal
import time
import warnings
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable

from converter.errors import MxconvError
from converter.run.forked import Forked, Zygote, spawn, subreaper

WORKERS_PER_PROCESS = 4  # 4 x 4 beat 2 x 8 and 1 x 16 on the 16-core H200 VM
MAX_PROCESSES = 8  # each costs about a torch import's memory (see the README's peak RSS)
_MIN_CORES = 8
_KEEP_MARGIN = 10.0  # seconds: a kept process is not taken this close to the end of its wait


def process_count(device: str, workers: int | None) -> int:
    """Conversion processes for these options on this machine (before the plan: the shard count
    may lower it later). MXCONV_PROCESSES sets it (read here only)."""
    env = os.environ.get("MXCONV_PROCESSES")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0))
    if device.startswith("cpu"):
        cpu = workers or cores
    elif os.environ.get("MXCONV_CPU_HELPERS", "").strip() == "0":
        return 1  # GPUs alone: the host only copies
    else:
        cpu = cores
    if cpu < _MIN_CORES:
        return 1
    return min(MAX_PROCESSES, cpu // WORKERS_PER_PROCESS)


def _cannot_start(e: OSError) -> MxconvError:  # out of processes or memory
    return MxconvError(f"cannot start a conversion process: {e.strerror or e}; rerun the same command "
                       "to resume (or pass --processes 1)")


class _Child:
    def __init__(self, warm: tuple = (), forked: tuple | None = None):
        """A new process (`warm`: its DEVICE WORKERS COUNT INDEX), or, with `forked` (connection,
        `forked.Forked`), one that a zygote starts."""
        if forked is not None:
            self.conn, self.proc = forked
        else:
            ours, theirs = Pipe()
            try:
                self.proc = spawn("entry", [str(theirs.fileno()), *map(str, warm)], [theirs.fileno()])
            except OSError as e:
                ours.close()
                raise _cannot_start(e) from None
            finally:
                theirs.close()
            self.conn: Connection = ours
        self.environment = _environment()
        self.reused = False  # taken from an earlier run (`keep`) for the current one

    def tell(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:  # it is gone; its exit is reported where the parent waits for it
            pass

    def dismiss(self) -> None:
        """No job for it: it exits once its imports are done (not waited for)."""
        self.tell(None)
        self.conn.close()


def _environment() -> tuple:
    """What a process keeps from the environment it started in and a kept one must match to be
    reused: the GPUs it may see (Ray sets CUDA_VISIBLE_DEVICES per task) and mxconv's settings."""
    return tuple(sorted((k, v) for k, v in os.environ.items()
                        if k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") or k.startswith("MXCONV_")))


_warm: list[_Child] = []
_kept: list[tuple[_Child, float]] = []  # processes of an earlier run waiting for jobs, with their deadline
reused = 0  # processes the last run took from an earlier one (`keep`)


def warm_up(count: int, device: str = "cpu", workers: int | None = None) -> None:
    """Start `count` processes now, so that their imports overlap the caller's own start-up and
    planning; `run` takes them. They are forked by one process that imports once (`forked.py`;
    this process becomes a subreaper for that, for good: meant for a command's own process),
    so that they are ready together. With `--device cuda`, each also creates the CUDA contexts of
    the GPUs it is likely to be dealt (that took about a second). Unused ones are dismissed at
    exit."""
    need = count - len(_warm) if count > 1 else 0
    if need <= 0:
        return
    if not subreaper():
        while len(_warm) < count:
            _warm.append(_Child((device, workers or 0, count, len(_warm))))
        return
    pairs = [Pipe() for _ in range(need)]
    try:
        zygote = Zygote([theirs.fileno() for _, theirs in pairs], (device, workers or 0, count, len(_warm)))
    except OSError as e:
        for ours, _ in pairs:
            ours.close()
        raise _cannot_start(e) from None
    finally:
        for _, theirs in pairs:
            theirs.close()
    _warm.extend(_Child(forked=(ours, Forked(zygote, i))) for i, (ours, _) in enumerate(pairs))


@atexit.register
def dismiss_warm() -> None:
    """Let the processes `warm_up` started and no run took go (a run that stays in one process,
    a conversion already complete, an error): they exit once their imports are done."""
    while _warm:
        _warm.pop().dismiss()
    while _kept:
        _kept.pop()[0].dismiss()


def _take(count: int) -> list[_Child]:
    """Processes for a run: kept ones first (in their order: the same devices are dealt to the
    same process), then warm ones, then new ones."""
    now, environment = time.monotonic(), _environment()
    kept = [c for c, deadline in _kept
            if c.proc.poll() is None and now < deadline - _KEEP_MARGIN and c.environment == environment]
    for c, _ in _kept:
        if c not in kept:
            c.dismiss()
    _kept.clear()
    warm = [c for c in _warm if c.proc.poll() is None]
    _warm.clear()
    children = (kept + warm)[:count]
    for c in (kept + warm)[count:]:
        c.dismiss()
    for i, c in enumerate(children):
        c.reused = i < len(kept)
    return children + [_Child() for _ in range(count - len(children))]


def deal(devices: list, count: int) -> list[list]:
    """The run's workers (torch devices or their names) as `count` processes get them: the GPU
    workers of GPU i all in process i mod count (one CUDA context per GPU: contexts of several
    processes on one GPU take turns), and the CPU workers spread evenly over the processes as if
    there were no GPU workers, the extra ones to processes without a GPU first. So a GPU worker
    adds to its process instead of taking a CPU worker's place there: every process gets the same
    share of the bytes (`share`), and where a process of 16 workers had 2 GPU + 2 CPU workers
    beside 4 CPU workers in each of the others, a BF16 source took it 13-18 % longer to convert
    than with 1 GPU worker (16-core H100 VMs, `--no-source-hash`): a GPU worker converts less
    than a core does there. More GPU workers never leave a process fewer CPU workers. That was
    not the whole gap: with this deal, 2 GPU workers still took 9 % (BF16) and 17 % (FP8) longer
    than 1 without the hash on two more such VMs, as long as 1 with it."""
    parts: list[list] = [[] for _ in range(count)]
    for d in devices:
        if str(d).startswith("cuda"):
            parts[int(str(d).partition(":")[2] or 0) % count].append(d)
    order = sorted(range(count), key=lambda i: (bool(parts[i]), i))
    for k, d in enumerate(d for d in devices if not str(d).startswith("cuda")):
        parts[order[k % count]].append(d)
    return parts


def share(shards: list, count: int) -> list[list]:
    """The shards as `count` processes get them: in plan order, each to the process with the fewest
    source bytes so far (ties: the one with fewer shards, then the first, so that shards of one
    size, or of none, go in turn). A heavier shard (the embedding's) is made up for by a lighter
    one later. Dealt in turn, the 9 output shards of the bench's 15 GB FP8 source gave one of 4
    processes 3.99 GB against 3.77-3.79, and that process finished last in 32 of 67 runs (16-core
    VM; a quarter would be chance); by bytes the most is 3.94 GB (the small ninth shard has to go
    somewhere)."""
    parts: list[list] = [[] for _ in range(count)]
    loads = [0] * count
    for shard in shards:
        k = min(range(count), key=lambda i: (loads[i], len(parts[i]), i))
        parts[k].append(shard)
        loads[k] += sum(j.input_bytes for j in shard.jobs)
    return parts


def _error(outcome: tuple, pid: int) -> BaseException:
    kind = outcome[0]
    if kind == "error":
        _, module, name, message, file, tensor = outcome
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = MxconvError
        if not (isinstance(cls, type) and issubclass(cls, MxconvError)):
            cls = MxconvError
        return cls(message, file=file, tensor=tensor)
    if kind == "crash":  # a bug: one line, the process's traceback with MXCONV_DEBUG=1 (as the CLI's own)
        lines = outcome[1].strip().splitlines()
        return RuntimeError(f"conversion process {pid} failed: "
                            + (outcome[1] if os.environ.get("MXCONV_DEBUG") else lines[-1] if lines else "?"))
    return KeyboardInterrupt()


def _died(child: _Child) -> MxconvError:
    code = child.proc.wait()
    try:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    except ValueError:  # a signal without a name (SIGRTMIN + n)
        how = f"was killed by signal {-code}"
    why = ("a source file cut short while it was being converted, a disk read error, or the output's "
           "file system full?"
           if code == -signal.SIGBUS else "out of memory?")  # SIGBUS: see safetensors.map_tensor
    return MxconvError(f"conversion process {child.proc.pid} {how} before it finished its shards ({why}); "
                       "rerun the same command to resume")


def run(shards: list, count: int, job: dict, devices: list, progress: Callable[[int], None],
        reading: Callable[[Path], None], keep: float = 0.0) -> int:
    """Write `shards` with `count` processes (at most one per shard, and only as many as `deal`
    gives workers to). `job`: what every process gets besides its shards and devices: dst, recipe,
    and the source as `view` (the canonical view, pickled once into bytes, see `write`) or as
    `opener` (a picklable callable each process calls to open it; tests use it); `devices`: the
    run's workers (torch devices). Returns the number of processes once
    every one has finished; raises the first error (or KeyboardInterrupt) after all have stopped.
    `keep` > 0: if every process succeeds, they wait that many seconds for the next run's jobs
    (see `_take`) instead of exiting."""
    global reused
    parts = [p for p in deal(devices, max(1, min(count, len(shards), len(devices)))) if p]
    count = len(parts)  # one GPU's workers alone, say: fewer processes than asked
    cores = max(1, len(os.sched_getaffinity(0)) // count)
    children = _take(count)
    live = {c.conn: c for c in children}
    done: dict[_Child, float] = {}  # finished their job, waiting for another (`keep`): until when
    first: BaseException | None = None

    def stop_all() -> None:
        for c in live.values():
            c.tell("stop")

    jobs: dict[_Child, dict] = {}
    heard: set[_Child] = set()
    try:
        for c, mine, theirs in zip(children, parts, share(shards, count)):
            jobs[c] = dict(job, shards=theirs, devices=[str(d) for d in mine], cores=cores, keep=keep)
            c.tell(jobs[c])
        while live:
            try:
                ready = wait(list(live))
                for conn in ready:
                    c = live[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message is None and c.reused and c not in heard and first is None:
                        # a kept process gone before it heard the job (its wait ended, the OOM
                        # killer): a new one takes the job, which nothing has started
                        del live[conn]
                        conn.close()
                        c.proc.wait()
                        fresh = _Child()
                        children[children.index(c)] = fresh
                        jobs[fresh] = jobs[c]
                        live[fresh.conn] = fresh
                        fresh.tell(jobs[fresh])
                        continue
                    heard.add(c)
                    if keep and message == ("done",):
                        del live[conn]
                        done[c] = time.monotonic() + keep
                    elif message is None or message[0] in ("done", "interrupted", "error", "crash"):
                        del live[conn]
                        conn.close()
                        failure = _died(c) if message is None else (None if message[0] == "done" else
                                                                     _error(message, c.proc.pid))
                        c.proc.wait()
                        if failure is not None and first is None:
                            first = failure
                            stop_all()
                    elif message[0] == "progress":
                        progress(message[1])
                    elif message[0] == "reading":
                        reading(Path(message[1]))
                    elif message[0] == "warning":
                        warnings.warn(message[1], stacklevel=1)
                    # ("ready", when): its imports were done then (for scripts/timeline.py)
            except KeyboardInterrupt as e:  # passed on; wait for them to remove their unfinished shards
                first = first or e
                stop_all()
    finally:
        reused = sum(c.reused for c in children)  # a replaced one is not
        succeeded = first is None and not live
        if succeeded:  # kept for the next run, in their order
            _kept.extend((c, done[c]) for c in children if c in done)
        else:
            for c in done:
                c.dismiss()
                c.proc.wait()
        for c in children:  # only after an error in this loop itself: never leave one running
            if c.proc.poll() is None and not (succeeded and c in done):
                c.tell("stop")
                c.conn.close()
                c.proc.wait()
    if first is not None:
        raise first
    return count


def write(shards: list, count: int, job: dict, devices: list, progress: Callable[[int], None],
          reading: Callable[[Path], None], view: Callable[[], object], partial_tag: str = "",
          keep: float = 0.0) -> int:
    """Write `shards` in `count` processes (`run`) where more than one would have work, else in
    this one (`partial_tag` marks its temporary files there). `view()` gives the source's canonical
    view, which the processes get with their job, as planned from, pickled once: opening the
    source again in each reads every header and parses the built-in data. On the 2-core VM, for
    a 259-tensor FP8 source, opening took 4.1 ms, pickling 1.0 and unpickling 1.1; for a
    1760-tensor one, opening 27-39 ms and unpickling 5. At a DeepSeek V3's 92k tensors that is
    about 1.4 s to open against 0.4 s to unpickle (each process) and 0.35 s to pickle (once).
    Returns the number of processes that wrote them."""
    global reused
    if min(count, len(shards), len(devices)) > 1:
        return run(shards, count, dict(job, view=pickle.dumps(view(), protocol=pickle.HIGHEST_PROTOCOL)),
                   devices, progress, reading, keep=keep)
    reused = 0
    dismiss_warm()  # started by the CLI, or kept by an earlier run, for nothing: let them go now
    from converter.run.execute import execute

    execute(shards, view(), Path(job["dst"]), job["recipe"], devices, progress, reading=reading,
            partial_tag=partial_tag)
    return 1
