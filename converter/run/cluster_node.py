"""What runs on the nodes of a Ray cluster during `mxconv convert --ray` (`cluster.py` is the
driver's side): the check that a node sees SRC and DST as the driver does, a task that writes a
group of planned shards with the one-machine executor (`execute.py`, its workers and devices
as `--workers` and `--device` say, on that node), and a task that hashes source files.

Nothing here is Ray-specific except the node id a task reports, and nothing imports torch at
module level: a check task on a node that never converts stays light. Each node opens the source
itself, through the picklable opener the driver ships (`SourceSpec`), so whatever the driver's
`open_source` reads (any source kind, any name mapping) the nodes read the same way.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from converter.errors import MxconvError, OutputError, SourceError
from converter.files import STATE_DIR
from converter.version import __version__

_REPORT_EVERY = 0.25  # seconds between progress reports of a task
# A task's conversion processes wait this long for the node's next task, which then skips their
# start-up (a torch import each, CUDA contexts: about 2 s, against 4 or more tasks per node).
KEEP_PROCESSES = 60.0


@dataclass(frozen=True)
class SourceSpec:
    """The source as every node opens it. `opener()` returns the canonical view (a module-level
    function or a functools.partial of one, so it pickles by name); `key` changes whenever the
    source or the plan does (it is the resume manifest's hash), so a worker process that kept a
    view from an earlier run never reuses it for another. `files`: (path relative to `root`, size,
    sha256 or None) of what a node must see exactly as the driver does."""

    root: str
    opener: Callable
    key: str
    files: tuple[tuple[str, int, str | None], ...]


@dataclass(frozen=True)
class Token:
    """A file the driver writes into DST's state directory just before the run; a node that does
    not read the same bytes at the same path does not share DST with the driver."""

    name: str
    value: str

    def path(self, dst: str | Path) -> Path:
        return Path(dst) / STATE_DIR / self.name


_views: dict[str, object] = {}  # key -> canonical view, the last one only, per worker process
_views_lock = threading.Lock()


def open_view(spec: SourceSpec):
    with _views_lock:
        view = _views.get(spec.key)
        if view is None:
            _views.clear()
            view = _views[spec.key] = spec.opener()
        return view


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _node() -> tuple[str, str]:
    """(node id, host name) of the node this runs on."""
    import ray

    return ray.get_runtime_context().get_node_id(), socket.gethostname()


def check_node(spec: SourceSpec, dst: str, token: Token) -> dict:
    """What this node sees of SRC and DST, as a list of problems (empty: all as on the driver)."""
    node_id, host = _node()
    problems = []
    root = Path(spec.root)
    if not root.is_dir():
        problems.append(f"cannot see the source directory {root}")
    else:
        for rel, size, digest in spec.files:
            path = root / rel
            try:
                if path.stat().st_size != size:
                    problems.append(f"sees {path} with {path.stat().st_size} bytes, the driver {size}")
                elif digest is not None and file_sha256(path) != digest:
                    problems.append(f"sees another {path} than the driver does (its sha256 differs)")
            except OSError as e:
                problems.append(f"cannot read {path}: {e.strerror}")
            if len(problems) > 2:
                break
    try:
        seen = token.path(dst).read_text()
    except OSError:
        seen = None
    if seen != token.value:
        problems.append(f"cannot see the destination {dst} (the file {token.path(dst)} the driver just wrote "
                        f"{'is missing' if seen is None else 'holds other bytes'} there)")
    elif not os.access(token.path(dst).parent, os.W_OK | os.X_OK):
        problems.append(f"cannot write into {token.path(dst).parent}")
    return {"node": node_id, "host": host, "version": __version__, "problems": problems}


class ProgressBoard:
    """Bytes done per task, set (not added) by the tasks: a task retried after its node was lost
    starts again from what its retry skips, and the total never counts its first try twice."""

    def __init__(self):
        self.done: dict[str, int] = {}

    def set(self, key: str, nbytes: int) -> None:
        self.done[key] = nbytes

    def total(self) -> int:
        return sum(self.done.values())


class _Reporter:
    """A task's progress callback: adds bytes (from the executor's writer thread), sends the
    running total to the board at most every _REPORT_EVERY seconds, without waiting."""

    def __init__(self, board, key: str, start: int):
        self.board, self.key, self.done, self.sent_at = board, key, start, 0.0
        self.lock = threading.Lock()
        self.send()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            if time.monotonic() - self.sent_at >= _REPORT_EVERY:
                self.send()

    def send(self) -> None:
        self.sent_at = time.monotonic()
        if self.board is not None:
            try:
                self.board.set.remote(self.key, self.done)
            except Exception:  # progress is best effort; the conversion goes on without it
                self.board = None


def run_group(spec: SourceSpec, dst: str, token: Token, shards: list, recipe, device: str, workers: int | None,
              processes: int | None, hash_files: list[str], board, key: str) -> dict:
    """Write `shards` (ShardPlans of the driver's plan) into DST, skipping those already finished
    there (a retry after a lost node, or a finished attempt of a node that was declared dead),
    with `processes` conversion processes on this node (None: as many as `process_count` says
    here), and hash the source files this task owns. Returns what the driver records."""
    node_id, host = _node()
    try:
        seen = token.path(dst).read_text()
    except OSError:
        seen = None
    if seen != token.value:
        raise OutputError(f"node {node_id[:8]} ({host}) does not see the destination the driver writes (no "
                          f"{token.name} in its state directory): every node needs SRC and DST at the same paths",
                          file=dst)
    from converter.run import processes as local
    from converter.run.devices import resolve_devices
    from converter.run.output import shard_is_done
    from converter.sources.hashing import SourceHasher

    todo = [s for s in shards if not shard_is_done(Path(dst) / s.name, s)]
    written = {s.name for s in todo}
    skipped = sum(j.input_bytes for s in shards if s.name not in written for j in s.jobs)
    reporter = _Reporter(board, key, skipped)
    hasher = SourceHasher([Path(spec.root) / rel for rel in hash_files]).start()
    count = reused = 0
    try:
        devices = resolve_devices(device, workers)
        if todo:  # temporary files: .{node}.p{pid} in conversion processes, .{node}-{pid} here
            count = local.write(todo, processes or local.process_count(device, workers),
                                {"dst": dst, "recipe": recipe, "partial_tag": f".{node_id[:8]}"},
                                devices, reporter.add, hasher.release, view=lambda: open_view(spec),
                                partial_tag=f".{node_id[:8]}-{os.getpid()}", keep=KEEP_PROCESSES)
            reused = local.reused
    except MxconvError as e:
        raise type(e)(f"{e.message} (on node {node_id[:8]}, {host})", file=e.file, tensor=e.tensor) from None
    finally:
        reporter.send()
    return {"node": node_id, "host": host, "hashes": hasher.result(), "written": sorted(written),
            "processes": count, "reused_processes": reused}


def hash_files(root: str, names: list[str]) -> dict[str, str]:
    """sha256 of source files no conversion task read (everything they feed is already written)."""
    from converter.sources.hashing import SourceHasher

    hasher = SourceHasher([Path(root) / n for n in names]).start()
    try:
        return hasher.result()
    except MxconvError as e:
        raise SourceError(f"{e.message} (on node {socket.gethostname()})") from None
