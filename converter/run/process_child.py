"""One conversion process of a run that `processes.py` spreads over several (this is its side).

Started by `processes.py` as `python -c` with the parent's sys.path, running `entry` with FD
[DEVICE WORKERS COUNT INDEX], in its own session (a terminal's Ctrl-C reaches the parent only,
which passes it on), FD being one end of a socket pair to the
parent. It imports torch and loads the compiled kernels at once (a parent that started it early
overlaps that with its own start-up), then waits for one job: a list of the plan's shards, how to
open the source, the recipe and this process's devices. It runs the one-machine executor on them
and reports back, all as pickled tuples:

    ("progress", bytes)  ("reading", path)  ("warning", Warning)
    then one of: ("done",)  ("interrupted",)  ("error", module, class, message, file, tensor)
    ("crash", traceback)

A "stop" from the parent, or the parent's end closing (it died), is taken as Ctrl-C: the
executor removes this process's unfinished shards and the process exits.
"""

from __future__ import annotations

import os
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


def _watch(conn: Connection) -> None:
    """A "stop", or the parent gone (end of file), interrupts the main thread as Ctrl-C would."""
    try:
        while conn.recv() != "stop":
            pass
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGINT)


def _run(job: dict, sender: _Sender) -> None:
    import torch

    from converter.run.execute import execute

    os.environ["MXCONV_CORE_SHARE"] = str(job["cores"])  # devices.cores(): this process's threads
    view = job["opener"]()
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


def main(fd: int, warm: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    conn = Connection(fd)
    sender = _Sender(conn)
    try:
        import converter.run.execute  # noqa: F401  (torch, the pipeline: before the job comes)
        from converter.errors import MxconvError
        from converter.numerics import native

        native.load()
        if warm and warm[0].startswith("cuda"):
            _warm_gpus(warm[0], *map(int, warm[1:]))
    except Exception:  # a broken installation: the parent reads this once it has sent the job
        sender.send("crash", traceback.format_exc())
        return 1
    try:
        job = conn.recv()
    except (EOFError, OSError):  # dismissed (no work for it), the parent gone, or a job cut short
        return 0
    except Exception:  # it does not unpickle here (a class the parent defined in its __main__...)
        sender.send("crash", traceback.format_exc())
        return 1
    if job is None:
        return 0
    warnings.showwarning = lambda message, category, *a, **k: sender.send("warning", category(str(message)))
    try:
        try:  # Ctrl-C comes from here on (the watcher's SIGINT), up to the finally
            _start_watcher(conn)
            _run(job, sender)
            outcome = ("done",)
        finally:  # none after this: a Ctrl-C inside the outcome's message would cut the stream
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        outcome = ("interrupted",)
    except MxconvError as e:
        outcome = ("error", type(e).__module__, type(e).__qualname__, e.message, e.file, e.tensor)
    except BaseException:
        outcome = ("crash", traceback.format_exc())
    sender.flush()
    sender.send(*outcome)
    return 0


def _start_watcher(conn: Connection) -> None:
    """The watcher thread, started with SIGINT blocked (threads inherit the mask): the SIGINT it
    sends is then taken by the main thread alone, and stays pending while `execute` holds it
    blocked to start its threads."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        threading.Thread(target=_watch, args=(conn,), name="mxconv-watch", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exit(code: int) -> None:
    """Without the interpreter's teardown: with torch loaded it took 0.3 s or more, and the parent
    waits for this process to end before its own run ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry(argv: list[str]) -> None:
    """`processes.py` starts `python -c` with its own sys.path, then this."""
    try:
        code = main(int(argv[0]), argv[1:])
    except (BrokenPipeError, EOFError, OSError):  # the parent went away while we reported
        code = 1
    except KeyboardInterrupt:  # a stop before the job's outcome was settled: the parent was told nothing
        code = 130
    _exit(code)
