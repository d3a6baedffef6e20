"""A run's warm conversion processes forked by one process that imported once (the "zygote",
`process_child.zygote`), and waited for as this process's own children: a zygote's forks are
reparented to this process when the zygote exits, since `subreaper` makes it their subreaper
(Linux's PR_SET_CHILD_SUBREAPER). `processes.warm_up` uses it; where `subreaper` fails, each
process is started as a new interpreter instead."""

from __future__ import annotations

import os
import subprocess
import sys

from converter.libc import libc


def spawn(function: str, args: list[str], fds: list[int]) -> subprocess.Popen:
    """`python -c` running `function(args)` of `process_child`, with this process's sys.path (not
    `python -m`'s, which puts the working directory first: a `converter/` folder there would be
    imported instead of this package), the file descriptors `fds` passed on, in a session of
    its own (a terminal's Ctrl-C reaches the parent alone, which passes it on)."""
    boot = (f"import sys; sys.path[:] = {sys.path!r}; "
            f"from converter.run.process_child import {function}; {function}(sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", boot, *args], pass_fds=fds, stdin=subprocess.DEVNULL,
                            start_new_session=True)


class Zygote:
    """The process that imports once and forks a run's warm processes (`process_child.zygote`)."""

    def __init__(self, fds: list[int], warm: tuple):
        r, w = os.pipe()
        try:
            self.proc = spawn("zygote", [str(w), *map(str, warm), *map(str, fds)], [w, *fds])
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.report, self.read, self.pids = r, bytearray(), None

    def started(self) -> list[int]:
        """The pids of the processes it forked, in order, once it has exited (waits for that: its
        imports); fewer than asked if it died first or could not start them all."""
        if self.pids is None:  # (kept across a Ctrl-C in here: called again, it goes on reading)
            while chunk := os.read(self.report, 4096):
                self.read += chunk
            self.proc.wait()  # gone: the processes it forked are this one's children now
            self.pids = [int(p) for p in self.read.split()]
            os.close(self.report)
        return self.pids

    def gone(self) -> bool:
        return self.pids is not None or self.proc.poll() is not None


class Forked:
    """`_Child.proc` (pid, poll(), wait() as Popen's) of a process a zygote forked: this process
    is its subreaper, so it waits for it as for its own child once the zygote has exited."""

    def __init__(self, zygote: Zygote, index: int):
        self.zygote, self.index, self.returncode = zygote, index, None

    @property
    def pid(self) -> int:
        pids = self.zygote.started()
        return pids[self.index] if self.index < len(pids) else self.zygote.proc.pid

    def poll(self) -> int | None:
        """None while it runs, and while the zygote has not forked it yet (it is importing)."""
        if self.returncode is None and self.zygote.gone():
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            self._reap(0)
        return self.returncode

    def _reap(self, flags: int) -> None:
        pids = self.zygote.started()
        if self.index >= len(pids):  # the zygote died before it forked this one
            self.returncode = self.zygote.proc.returncode or 1
            return
        try:
            got, status = os.waitpid(pids[self.index], flags)
        except ChildProcessError:  # reaped by someone else: its status is lost
            self.returncode = 0
            return
        if got:
            self.returncode = os.waitstatus_to_exitcode(status)


def subreaper() -> bool:
    """Make this process the subreaper of the processes it starts (Linux), so that a zygote's
    forks become its children when the zygote exits; False where that cannot be done."""
    try:
        return libc().prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False
