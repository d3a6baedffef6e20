"""Safetensors at the byte level: validated header parsing, lazy tensor reads by offset, and a
shard writer whose header is planned before any data exists.

We parse headers ourselves (instead of safetensors.safe_open) to name the file and tensor in
every error, to detect truncation before a long run starts, and to read exactly one tensor's
bytes with a positioned read into a preallocated buffer (one copy, GIL released).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .direct_io import DirectFile, open_direct, phase
from .errors import OutputError, SourceError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {code: torch.empty(0, dtype=dt).element_size() for code, dt in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute [start, end) offsets in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (tensors, __metadata__)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError("file is shorter than a safetensors header (truncated?)", file=path)
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise SourceError(f"header length {n} exceeds the file size {size} (truncated or not safetensors)",
                                  file=path)
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", file=path) from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long, nesting
        raise SourceError(f"header is not valid JSON: {e}", file=path) from None
    if not isinstance(header, dict):
        raise SourceError("header is not a JSON object", file=path)
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError("__metadata__ is not an object", file=path)
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info = _parse_entry(path, name, entry, data_start)
        if info.end - data_start > data_len:
            raise SourceError(f"data ends at byte {info.end} but the file has {size} bytes (truncated)",
                              file=path, tensor=name)
        infos[name] = info
        spans.append((info.start, info.end, name))
    spans.sort()
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise SourceError(f"data of {n0} and {n1} overlap", file=path, tensor=n1)
    return infos, {str(k): str(v) for k, v in metadata.items()}


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SourceError("header entry is not an object", file=path, tensor=name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SourceError(f"unsupported dtype {dtype!r}", file=path, tensor=name)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise SourceError(f"bad shape {shape!r}", file=path, tensor=name)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise SourceError(f"bad data_offsets {offsets!r}", file=path, tensor=name)
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SourceError(f"header says {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} "
                          f"needs {expected}", file=path, tensor=name)
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_tensor(info: TensorInfo, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from disk into a fresh CPU tensor (optionally pinned), or into the
    first bytes of `out` (a contiguous uint8 CPU tensor), which the result then shares."""
    if out is None:
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
    else:  # reusing buffers spares the page faults (and, in VMs, host faults) of fresh memory
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu" or out.numel() < info.nbytes:
            raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {info.nbytes} bytes")
        buf = out.view(-1)[: info.nbytes]
    view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as e:
        raise SourceError(f"cannot open: {e.strerror}", file=info.file, tensor=info.name) from e
    try:
        got = 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.start + got)
            if n <= 0:
                raise SourceError(f"file ended after {got} of {info.nbytes} bytes (truncated)",
                                  file=info.file, tensor=info.name)
            got += n
    except OSError as e:
        raise SourceError(f"read failed: {e.strerror}", file=info.file, tensor=info.name) from e
    finally:
        os.close(fd)
    return buf.view(info.torch_dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def build_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialized header (padded to 8 bytes, as the safetensors library does) and each tensor's
    absolute file offset, with tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, int] = {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little") + raw
    return prefix, {k: v + len(prefix) for k, v in offsets.items()}


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


def write_bytes_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write a small file atomically (see write_atomic)."""
    write_atomic(path, lambda f: f.write(data), tmp_dir)
