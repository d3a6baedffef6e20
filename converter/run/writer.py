"""Writing planned safetensors shards: `ShardWriter` puts every tensor at its planned offset (O_DIRECT
where the file system allows), then fsyncs and renames; small files are written atomically too."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from converter.errors import OutputError
from converter.run.direct_io import DirectFile, open_direct, phase
from converter.sources.safetensors import DTYPE_CODES, PlannedTensor, build_header


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


class ShardWriter:
    """Writes one planned shard: header first, tensors at their planned offsets, then fsync and an
    atomic rename from `tmp_path` to `path`. Refuses tensors that are not in the plan, have the
    wrong dtype/shape, or come twice; refuses to finish while any planned tensor is missing."""

    def __init__(self, path: Path, tmp_path: Path, tensors: list[PlannedTensor], direct: bool = True):
        self.path, self.tmp_path = Path(path), Path(tmp_path)
        self.planned = {t.name: t for t in tensors}
        self.header, self.offsets = build_header(tensors)
        self.size = len(self.header) + sum(t.nbytes for t in tensors)
        self.written: set[str] = set()
        self.parts: dict[str, list[tuple[int, int]]] = {}  # row spans written so far, by tensor
        self.covered: dict[str, int] = {}
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.want_direct = direct
        self.direct: DirectFile | None = None  # O_DIRECT writes (no page cache) where supported

    def __enter__(self) -> "ShardWriter":
        self.tmp_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.direct = open_direct(self.tmp_path, self.size) if self.want_direct else None
            if self.direct is not None:
                self.fd = self.direct.fd
                self.direct.write(torch.frombuffer(bytearray(self.header), dtype=torch.uint8), 0)
            else:
                self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(self.fd, self.size)
                self._pwrite(memoryview(self.header), 0)
        except OSError as e:
            self._abort()
            raise OutputError(f"cannot write: {e.strerror}", file=self.tmp_path) from e
        return self

    def phase(self, name: str, row: int = 0) -> int:
        """Alignment (address modulo 4096) at which a buffer for `name` from `row` on is written
        without a copy."""
        plan = self.planned[name]
        rows = plan.shape[0] if plan.shape else 1
        return phase(self.offsets[name] + (plan.nbytes // rows * row if rows else 0))

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
        with self.lock:
            spans = self.parts.setdefault(name, [])
            if name in self.written or any(a < span[1] and span[0] < b for a, b in spans):
                raise OutputError("tensor written twice", file=self.path, tensor=name)
            spans.append(span)
        offset = self.offsets[name] + (plan.nbytes // rows * row if rows else 0)
        try:
            if self.direct is not None:
                t = tensor.detach().contiguous()
                self.direct.write((t if t.device.type == "cpu" else t.cpu()).view(torch.uint8).reshape(-1), offset)
            else:
                self._pwrite(tensor_bytes(tensor), offset)
        except OSError as e:
            raise OutputError(f"write failed: {e.strerror}", file=self.tmp_path, tensor=name) from e
        with self.lock:
            self.covered[name] = self.covered.get(name, 0) + span[1] - span[0]
            if self.covered[name] == rows or not plan.shape:
                self.written.add(name)

    def _abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
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
