"""One conversion process of a run that `processes.py` spreads over several (this is its side).

Started by `processes.py` as `python -c` with the parent's sys.path (`forked.spawn`), running `entry`
with FD [DEVICE WORKERS COUNT INDEX], in its own session (a terminal's Ctrl-C reaches the parent
only, which passes it on), FD being one end of a socket pair to the parent; or forked with the
others of a run by one process that imported everything once (`zygote`). It imports torch, the
executor and what a job unpickles into, and loads the compiled kernels at once (a parent that
started it early overlaps that with its own start-up), then waits for a job: a list of the plan's
shards, the source (its canonical view, as the parent planned from it, or how to open it), the
recipe and this process's devices. It runs the one-machine
executor on them and reports back, all as pickled tuples:

    ("ready", perf_counter) once its imports are done (before its first job only; the parent
    reads it after sending the job and passes it over: it is for `scripts/timeline.py`, whose
    clock, CLOCK_MONOTONIC, is this process's too)
    ("progress", bytes)  ("reading", path)  ("warning", Warning)
    then one of: ("done",)  ("interrupted",)  ("error", module, class, message, file, tensor)
    ("crash", traceback)

A "stop" from the parent, or the parent's end closing (it died), is taken as Ctrl-C: the
executor removes this process's unfinished shards and the process exits. After "done", a job
that says `keep` (seconds; a Ray node's tasks do) leaves the process waiting that long for the
next job, so the next task on the node skips the start-up; anything else ends it.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from pathlib import Path

_REPORT_EVERY = 0.05  # seconds between progress messages


class _Sender:
    """Messages to the parent from any thread (a Connection is not thread-safe)."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()
        self.pending, self.sent_at = 0, 0.0

    def send(self, *message) -> None:
        with self.lock:
            self.conn.send(message)

    def progress(self, nbytes: int) -> None:
        with self.lock:
            self.pending += nbytes
            if time.monotonic() - self.sent_at >= _REPORT_EVERY:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.conn.send(("progress", self.pending))
            self.pending, self.sent_at = 0, time.monotonic()


class _Inbox:
    """What the parent sends, as the watcher thread (the only reader of the connection) passes it
    on: jobs (and None: dismissed) to the main thread; "stop", or the parent gone, to a running
    job as Ctrl-C, and to a job received but not started yet as a stop before it starts."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.running = self.stop_pending = False

    def interrupt(self) -> None:
        with self.lock:
            if self.running:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                self.stop_pending = True

    def set_running(self, running: bool) -> None:
        """Called by the main thread; raises KeyboardInterrupt for a job stopped before it started."""
        with self.lock:
            self.running = running
            stop, self.stop_pending = self.stop_pending, False
        if running and stop:
            raise KeyboardInterrupt


def _watch(conn: Connection, inbox: _Inbox) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent gone, or a message cut short
            inbox.interrupt()
            inbox.jobs.put(None)
            return
        except Exception:  # it does not unpickle here (a class the parent defined in its __main__...)
            inbox.jobs.put(("crash", traceback.format_exc()))
            return
        if message == "stop":
            inbox.interrupt()
        else:
            inbox.jobs.put(message)
            if message is None:
                return


def _run(job: dict, sender: _Sender) -> None:
    import torch

    from converter.run.execute import execute

    os.environ["MXCONV_CORE_SHARE"] = str(job["cores"])  # devices.cores(): this process's threads
    view = pickle.loads(job["view"]) if "view" in job else job["opener"]()
    devices = [torch.device(d) for d in job["devices"]]
    execute(job["shards"], view, Path(job["dst"]), job["recipe"], devices, sender.progress,
            reading=lambda path: sender.send("reading", str(path)),
            partial_tag=f"{job.get('partial_tag', '')}.p{os.getpid()}")


def _warm_gpus(device: str, workers: int, count: int, index: int) -> None:
    """Create the CUDA contexts of the GPUs this process is likely to be dealt (as `processes.run`
    deals the run's devices) before the job comes; a failure here is the job's to report."""
    import torch

    from converter.run.devices import resolve_devices
    from converter.run.processes import deal

    try:
        for d in dict.fromkeys(deal(resolve_devices(device, workers or None), count)[index]):
            if d.type == "cuda":
                torch.empty(1, device=d)
    except Exception:
        pass


def _import_ahead() -> None:
    """Import what the job unpickles into (the canonical view, its checkpoint and derivations,
    the plan and the recipe) while it has not come. The view comes as the parent planned from it
    (`processes.write`); opening the source again here parsed the built-in model families and
    namings and read every header (`processes.write` has the costs)."""
    from converter.run import pipeline  # noqa: F401  (the checkpoint, mappings, plan and recipe classes)
    from converter.sources import dcp  # noqa: F401  (a PyTorch DCP source's; pipeline imports it late)


def _imports() -> None:
    import converter.run.execute  # noqa: F401  (torch, the pipeline: before the job comes)
    from converter.numerics import native

    native.load()
    _import_ahead()


def main(fd: int, warm: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    conn = Connection(fd)
    sender = _Sender(conn)
    try:
        _imports()
        if warm and warm[0].startswith("cuda"):
            _warm_gpus(warm[0], *map(int, warm[1:]))
    except Exception:  # a broken installation: the parent reads this once it has sent the job
        sender.send("crash", traceback.format_exc())
        return 1
    sender.send("ready", time.perf_counter())
    inbox = _start_watcher(conn)
    warnings.showwarning = lambda message, category, *a, **k: sender.send("warning", category(str(message)))
    wait = None  # the first job: as long as it takes the parent to plan
    while True:
        try:
            job = inbox.jobs.get(timeout=wait)
        except queue.Empty:  # kept for a next job that did not come
            return 0
        if job is None:  # dismissed (no work for it), or the parent gone
            return 0
        if isinstance(job, tuple):  # ("crash", traceback): the job did not unpickle
            sender.send(*job)
            return 1
        outcome = _one_job(job, sender, inbox)
        sender.flush()
        sender.send(*outcome)
        wait = job.get("keep")
        if outcome[0] != "done" or not wait:
            return 0
        _let_go_of_gpu_memory()


def _let_go_of_gpu_memory() -> None:
    """While kept for a next job, hold no more of a GPU than the CUDA context: torch's cached
    blocks go back to the GPU (which Ray counts as free between tasks)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _one_job(job: dict, sender: _Sender, inbox: _Inbox) -> tuple:
    """Run a job to its outcome message. SIGINT (the watcher's, for a "stop") interrupts it from
    the moment it starts to the moment it has ended, and is ignored outside."""
    from converter.errors import MxconvError

    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            inbox.set_running(True)
            _run(job, sender)
            return ("done",)
        finally:  # none after this: a Ctrl-C inside the outcome's message would cut the stream
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            inbox.set_running(False)
    except KeyboardInterrupt:
        return ("interrupted",)
    except MxconvError as e:
        return ("error", type(e).__module__, type(e).__qualname__, e.message, e.file, e.tensor)
    except BaseException:
        return ("crash", traceback.format_exc())


def _start_watcher(conn: Connection) -> _Inbox:
    """The watcher thread, started with SIGINT blocked (threads inherit the mask): the SIGINT it
    sends is then taken by the main thread alone, and stays pending while `execute` holds it
    blocked to start its threads."""
    inbox = _Inbox()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        threading.Thread(target=_watch, args=(conn, inbox), name="mxconv-watch", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return inbox


def _exit(code: int) -> None:
    """Without the interpreter's teardown: with torch loaded it took 0.3 s or more, and the parent
    waits for this process to end before its own run ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def zygote(argv: list[str]) -> None:
    """A run's warm processes, forked from one that imported once (`processes.warm_up`). argv:
    REPORT DEVICE WORKERS COUNT FIRST FD... It imports what every process imports, forks one
    process per FD (its socket to the parent; its index is FIRST plus its place), writes their
    pids to REPORT and exits: they become the parent's children then (it is their subreaper).
    Four processes importing torch each, beside the parent's own import and the source hash, were
    ready up to 0.88 s apart on 16 cores, and in 10 of 12 runs one was still importing when its
    job came; forked, they were ready within 0.04 s of each other. Where this process has a
    thread besides its own (a library started one), a fork could inherit a lock that thread
    holds: the processes are spawned as new interpreters then."""
    from converter.run.forked import spawn

    report, device, workers, count, first, *fds = argv
    try:
        _imports()
    except Exception:  # each process runs into it again and reports it as its own (main)
        pass
    try:
        alone = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        alone = False
    for i, fd in enumerate(fds):
        warm = [device, workers, count, str(int(first) + i)]
        try:
            if alone:
                pid = os.fork()
                if pid == 0:
                    try:
                        for other in (report, *fds):
                            if other != fd:
                                os.close(int(other))
                        entry([fd, *warm])
                    finally:  # never back into this loop
                        os._exit(1)
            else:
                pid = spawn("entry", [fd, *warm], [int(fd)]).pid
            # each pid as it is known: if a later one cannot be started, these are still waited for
            os.write(int(report), f"{pid}\n".encode())
        except OSError:  # out of processes or memory, or the parent gone (its end of REPORT closed):
            break        # those not started see their socket close and are reported as such
    _exit(0)


def entry(argv: list[str]) -> None:
    """`processes.py` (or the zygote) starts this with FD [DEVICE WORKERS COUNT INDEX]."""
    try:
        code = main(int(argv[0]), argv[1:])
    except (BrokenPipeError, EOFError, OSError):  # the parent went away while we reported
        code = 1
    except KeyboardInterrupt:  # a stop before the job's outcome was settled: the parent was told nothing
        code = 130
    _exit(code)
