"""Writing planned safetensors shards: `ShardWriter` puts every tensor at its planned offset (O_DIRECT
where the file system allows; on tmpfs straight into a shared mapping of the file, which the
numerics can fill in place), then fsyncs and renames; `Turns` lets writer threads take turns on a
file that takes one write at a time; small files are written atomically too."""

from __future__ import annotations

import collections
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from converter.errors import OutputError
from converter.libc import Mutex
from converter.run.direct_io import (
    MADV_DONTNEED,
    DirectFile,
    in_memory_fs,
    madvise,
    open_direct,
    phase,
)
from converter.sources.safetensors import DTYPE_CODES, PlannedTensor, build_header


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _mutex() -> Mutex | None:
    try:
        return Mutex()
    except (OSError, AttributeError):  # no C library to take it with: the kernel's lock alone
        return None


def _free_bytes(folder: Path) -> int:
    """Room left on the file system of `folder`. A mapped file that runs out of room kills the
    process (SIGBUS) where write(2) fails cleanly, so a shard is mapped only where it fits."""
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


class ShardWriter:
    """Writes one planned shard: header first, tensors at their planned offsets, then fsync and an
    atomic rename from `tmp_path` to `path`. Refuses tensors that are not in the plan, have the
    wrong dtype/shape, or come twice; refuses to finish while any planned tensor is missing.

    On a file system in memory (tmpfs), with `mapped` None, the file is written through one shared
    mapping instead: `region` hands out the planned bytes of some rows as a tensor to fill (the
    numerics write there directly, reads land there), and writes of other tensors are copies into
    such regions. Why: every write(2) to one tmpfs file holds the file's lock for its memcpy, so
    threads writing one shard take turns; page faults in a mapping run in parallel, though each
    4 KB fault makes a page cost about twice the CPU of write(2) (which is why the executor maps
    only when it writes one shard at a time, see execute.py). A region's pages are unmapped (they
    stay in the file) once it is recorded, so resident memory holds the pieces in flight, not the
    shard. `mapped` False: write(2) at offsets, on any file system (the executor's choice; the
    environment variable MXCONV_MAPPED_WRITES overrides it there)."""

    def __init__(self, path: Path, tmp_path: Path, tensors: list[PlannedTensor], direct: bool = True,
                 mapped: bool | None = None):
        self.path, self.tmp_path = Path(path), Path(tmp_path)
        self.planned = {t.name: t for t in tensors}
        self.header, self.offsets = build_header(tensors)
        self.size = len(self.header) + sum(t.nbytes for t in tensors)
        self.written: set[str] = set()
        self.parts: dict[str, list[tuple[int, int]]] = {}  # row spans written so far, by tensor
        self.covered: dict[str, int] = {}
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.want_direct, self.want_mapped = direct, mapped
        self.direct: DirectFile | None = None  # O_DIRECT writes (no page cache) where supported
        self.mapped = False  # writes through a shared mapping (tmpfs)
        self.map: mmap.mmap | None = None
        self.view: torch.Tensor | None = None  # the whole file as uint8, over self.map
        self.placed: dict[tuple[str, int], tuple[int, int]] = {}  # regions handed out: (address, bytes)
        # write(2): the workers that write their own bytes (`stream_target`) hold this for each
        # write, in C, so that a second one sleeps until its turn instead of spinning on the file's
        # lock. Not the writer threads (Turns keeps them apart): taken from Python, it would stay
        # held until the thread had the GIL back after its write, and the C writers would wait on that.
        self.turn: Mutex | None = None

    def __enter__(self) -> "ShardWriter":
        self.tmp_path.parent.mkdir(parents=True, exist_ok=True)
        in_memory = in_memory_fs(self.tmp_path.parent)
        try:
            self.mapped = self.want_mapped
            if self.mapped is None:
                self.mapped = in_memory and _free_bytes(self.tmp_path.parent) > self.size
            if self.mapped:  # a shared writable mapping needs a file open for reading too
                self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(self.fd, self.size)
                self._pwrite(memoryview(self.header), 0)
                self.map = mmap.mmap(self.fd, self.size)
                self.view = torch.frombuffer(self.map, dtype=torch.uint8)
                return self
            # O_DIRECT only where there is a page cache to bypass: tmpfs accepts the flag (Linux 6.6
            # and later) but its pages are the file, and the unaligned edges would only cost work
            self.direct = open_direct(self.tmp_path, self.size) if self.want_direct and not in_memory else None
            if self.direct is not None:
                self.fd = self.direct.fd
                self.direct.write(torch.frombuffer(bytearray(self.header), dtype=torch.uint8), 0)
            else:
                self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(self.fd, self.size)
                self._pwrite(memoryview(self.header), 0)
                self.turn = _mutex()
        except OSError as e:
            self._abort()
            raise OutputError(f"cannot write: {e.strerror}", file=self.tmp_path) from e
        return self

    @property
    def one_at_a_time(self) -> bool:
        """Whether writes to this file run one at a time whatever the threads: buffered write(2)
        holds the file's lock (i_rwsem) for its copy, and a second writer spins on it, burning a
        core; O_DIRECT writes inside the file and a mapping's page faults run in parallel."""
        return not self.mapped and self.direct is None

    def phase(self, name: str, row: int = 0) -> int:
        """Alignment (address modulo 4096) at which a buffer for `name` from `row` on is written
        without a copy."""
        return phase(self._span(name, row, 0)[0])

    def _span(self, name: str, row: int, tensor_rows: int | None) -> tuple[int, int]:
        """File offset and byte count of rows [row, row + tensor_rows) of `name` (None: all of it)."""
        plan = self.planned[name]
        rows = plan.shape[0] if plan.shape else 1
        per_row = plan.nbytes // rows if rows else 0
        n = plan.nbytes if tensor_rows is None else per_row * tensor_rows
        return self.offsets[name] + per_row * row, n

    def _map(self, offset: int, nbytes: int) -> torch.Tensor:
        """nbytes of the file from `offset` as a writable uint8 tensor over the shared mapping.
        Its pages fault in as they are written (under the mapping's own lock, in parallel);
        allocating them ahead with MADV_POPULATE_WRITE holds the whole process's mmap lock
        meanwhile (and through Python's mmap.madvise, the GIL: that was slower)."""
        return self.view[offset:offset + nbytes]

    def _unmap(self, offset: int, nbytes: int) -> None:
        """Drop the pages wholly inside [offset, offset + nbytes) from this process (not from the
        file): written regions stop counting as resident memory."""
        a0, a1 = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if a1 > a0:
            madvise(self.view.data_ptr() + a0, a1 - a0, MADV_DONTNEED)

    def region(self, name: str, row: int = 0, rows: int | None = None) -> torch.Tensor | None:
        """Where the file is mapped: the planned bytes of `name`, rows [row, row + rows) (None:
        the whole tensor), as a flat uint8 tensor to fill; passing it (or a tensor over the same
        memory) to `write_rows` then records it without a copy. None where the file is not mapped."""
        if self.view is None or name not in self.planned:
            return None
        offset, n = self._span(name, row, rows if self.planned[name].shape else None)
        if not n:
            return None
        t = self._map(offset, n)
        with self.lock:
            self.placed[(name, row)] = (t.data_ptr(), n)
        return t

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        plan = self.planned.get(name)
        if plan is None:
            raise OutputError("tensor is not planned for this shard", file=self.path, tensor=name)
        if DTYPE_CODES.get(tensor.dtype) != plan.dtype or tuple(tensor.shape) != plan.shape:
            raise OutputError(f"got {tensor.dtype} {tuple(tensor.shape)}, planned {plan.dtype} {plan.shape}",
                              file=self.path, tensor=name)
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, row: int, tensor: torch.Tensor) -> None:
        """Rows [row, row + len(tensor)) of a planned tensor; the tensor counts as written once all
        of its rows have come, in any order and from any thread."""
        plan = self.planned.get(name)
        if plan is None:
            raise OutputError("tensor is not planned for this shard", file=self.path, tensor=name)
        rows = plan.shape[0] if plan.shape else 1
        if (DTYPE_CODES.get(tensor.dtype) != plan.dtype or tuple(tensor.shape[1:]) != tuple(plan.shape[1:])
                or (not plan.shape and row) or row < 0 or row + (len(tensor) if plan.shape else 1) > rows):
            raise OutputError(f"got {tensor.dtype} {tuple(tensor.shape)} at row {row}, planned {plan.dtype} "
                              f"{plan.shape}", file=self.path, tensor=name)
        span = (row, row + (len(tensor) if plan.shape else 1))
        self._claim(name, span)
        offset = self._span(name, row, 0)[0]
        try:
            if self.mapped:
                with self.lock:
                    placed = self.placed.pop((name, row), None)
                t = tensor.detach()
                nbytes = t.numel() * t.element_size()
                if placed != (t.data_ptr(), nbytes) or not t.is_contiguous() or t.device.type != "cpu":
                    if nbytes:  # not filled in place: copy it there
                        self._map(offset, nbytes).copy_(t.contiguous().view(torch.uint8).reshape(-1).cpu())
                self._unmap(offset, nbytes)
            elif self.direct is not None:
                t = tensor.detach().contiguous()
                self.direct.write((t if t.device.type == "cpu" else t.cpu()).view(torch.uint8).reshape(-1), offset)
            else:
                self._pwrite(tensor_bytes(tensor), offset)
        except OSError as e:
            raise OutputError(f"write failed: {e.strerror}", file=self.tmp_path, tensor=name) from e
        self._count(name, span)

    def stream_target(self, name: str, row: int, rows: int, row_bytes: int) -> tuple[int, int, int | None] | None:
        """(file descriptor, file offset of row `row` of `name`, address of the mutex to hold for
        each write or None) where this file is written with write(2) (`one_at_a_time`): a worker
        may write rows [row, row + rows) of `row_bytes` bytes each there itself as it makes them
        (`numerics.streamed`), then `record_rows`. None where it is not (O_DIRECT writes go
        through aligned blocks, a mapped file is filled in place), or where the plan has no such
        rows (then `write_rows` says what is wrong)."""
        plan = self.planned.get(name)
        if (not self.one_at_a_time or self.fd is None or plan is None or not plan.shape or row < 0 or rows < 1
                or row + rows > plan.shape[0] or plan.nbytes != plan.shape[0] * row_bytes):
            return None
        return self.fd, self._span(name, row, 0)[0], self.turn.address if self.turn else None

    def record_rows(self, name: str, row: int, rows: int) -> None:
        """Rows [row, row + rows) of `name`, written by the caller at `stream_target`'s place, count
        as `write_rows` counts what it writes."""
        plan = self.planned.get(name)
        if plan is None or not plan.shape or row < 0 or rows < 1 or row + rows > plan.shape[0]:
            raise OutputError(f"rows {row}-{row + rows} are not planned here", file=self.path, tensor=name)
        self._claim(name, (row, row + rows))
        self._count(name, (row, row + rows))

    def _claim(self, name: str, span: tuple[int, int]) -> None:
        with self.lock:
            spans = self.parts.setdefault(name, [])
            if name in self.written or any(a < span[1] and span[0] < b for a, b in spans):
                raise OutputError("tensor written twice", file=self.path, tensor=name)
            spans.append(span)

    def _count(self, name: str, span: tuple[int, int]) -> None:
        plan = self.planned[name]
        with self.lock:
            self.covered[name] = self.covered.get(name, 0) + span[1] - span[0]
            if not plan.shape or self.covered[name] == plan.shape[0]:
                self.written.add(name)

    def _unmap_all(self) -> None:
        """Forget the mapping; it goes with the last tensor over it (closing it under a live
        tensor would leave that tensor pointing at nothing)."""
        self.view = self.map = None

    def _abort(self) -> None:
        self._unmap_all()
        if self.fd is not None:
            fd, self.fd = self.fd, None  # never closed twice, even if this is run again after a Ctrl-C
            os.close(fd)
        self.tmp_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop the temporary file (the shard stays unwritten)."""
        self._abort()

    def finish(self) -> None:
        """fsync, then rename the temporary file to its final name: the shard exists only complete."""
        self.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        missing = set(self.planned) - self.written
        if missing:
            self._abort()
            raise OutputError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}",
                              file=self.path)
        try:
            self._unmap_all()
            if self.direct is not None:
                self.direct.close()  # remaining edge blocks, exact size, fsync
            else:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp_path, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self._abort()
            raise OutputError(f"cannot finish: {e.strerror}", file=self.path) from e


class Turns:
    """The outputs of one shard, written by one thread at a time where its file takes one write at
    a time anyway (`ShardWriter.one_at_a_time`): a writer that finds another one writing the shard
    leaves its output to that one and takes the next from the queue, instead of waiting on the
    file's lock in the kernel, where a waiter spins while a core is free (3.9 % of a 2-worker BF16
    conversion's CPU on tmpfs on a 2-core VM)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: collections.deque = collections.deque()
        self.busy = False

    def mine(self, item) -> Iterator:
        """`item` and whatever other threads leave here meanwhile, for this thread to write; nothing
        if another thread is writing the shard (it writes `item` too). A thread that stops taking
        them (the run is cancelled) drops those left, and the next one to come writes its own."""
        with self.lock:
            self.waiting.append(item)
            if self.busy:
                return
            self.busy = True
        item = None  # held by `waiting` until it is handed out: not kept here after it is written
        try:
            while True:
                with self.lock:
                    if not self.waiting:  # let go in the same hold that saw nothing left
                        self.busy = False
                        return
                    nxt = self.waiting.popleft()
                yield nxt
                nxt = None
        except GeneratorExit:  # closed at a yield: this thread stopped taking them
            with self.lock:
                self.busy = False
                self.waiting.clear()
            raise


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, fill, tmp_dir: Path | None = None) -> None:
    """Create `path` through a temporary file (in `tmp_dir`, by default next to it) that `fill(f)`
    writes, fsynced and renamed: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = (Path(tmp_dir) if tmp_dir is not None else path.parent) / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write: {e.strerror}", file=e.filename or path) from e
    except BaseException:  # Ctrl-C: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write a small file atomically (see write_atomic)."""
    write_atomic(path, lambda f: f.write(data), tmp_dir)
