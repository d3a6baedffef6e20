"""Run the real `mxconv` command line in a child process, fast.

Each call is a separate OS process running `converter.cli.main()` with its own stdout, stderr
and exit status, and can be killed with SIGKILL; a traceback would land in its stderr like in a
shell. The children fork from a multiprocessing forkserver that imported torch and mxconv once
(a fresh interpreter would spend seconds importing torch for every run; the forkserver itself has
run no torch ops, so forking it is safe).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PRELOAD = ["converter.cli", "converter.run.pipeline", "converter.run.summary", "converter.mapping.names", "cli_process"]
_context = None


def _ctx():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(argv: list[str], out: str, err: str) -> None:
    # Ctrl-C as in a terminal: a test run started in the background by a script (`cmd &`) has
    # SIGINT ignored, and an ignored signal stays ignored across fork and exec
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["mxconv", *argv]
    from tqdm import tqdm

    from converter.cli import main

    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: a killed child would leak it

    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what the interpreter would do: print it, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class MxconvProcess:
    """`mxconv ARGV...` started in a child process; `wait()` or `kill()` it."""

    def __init__(self, argv: list[str], logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logdir / f"out-{time.monotonic_ns()}", logdir / f"err-{time.monotonic_ns()}"
        self.proc = _ctx().Process(target=_child, args=([str(a) for a in argv], str(self.out), str(self.err)))
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup handler, no finally, no atexit
        self.proc.join()

    def wait(self, timeout: float = 120) -> Result:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.kill()
            raise TimeoutError(f"mxconv did not finish in {timeout} s")
        return Result(self.proc.exitcode, self.out.read_text(), self.err.read_text())


def run_mxconv(argv: list, logdir: Path, timeout: float = 120) -> Result:
    return MxconvProcess(argv, logdir).wait(timeout)


def reference_conversion(src, root: Path, shard: str) -> Path:
    """An uninterrupted `mxconv convert SRC DST -q --max-shard-size SHARD`, the bytes every
    interrupted-then-resumed run must end with."""
    dst = Path(root) / "dst"
    result = run_mxconv(["convert", src, dst, "-q", "--max-shard-size", shard], Path(root) / "logs")
    assert result.returncode == 0, result.stderr
    return dst
