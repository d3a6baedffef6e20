"""Safetensors at the byte level: validated header parsing, lazy tensor reads by offset, and the
header of a shard planned before any data exists (`PlannedTensor`, `build_header`; the writer is
`converter.run.writer`).

We parse headers ourselves (instead of safetensors.safe_open) to name the file and tensor in
every error, to detect truncation before a long run starts, and to read exactly one tensor's
bytes with a positioned read into a preallocated buffer (one copy, GIL released), or to map them
from the page cache (no copy: `map_tensor`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import SourceError
from converter.libc import MADV_POPULATE_READ, libc, map_file

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
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


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

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the tensor's bytes come from."""
        return (self.file,)


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
            if n > MAX_HEADER or 8 + n > size:
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


def target_buffer(nbytes: int, pin: bool, out: torch.Tensor | None) -> torch.Tensor:
    """nbytes to read a tensor into: a fresh CPU buffer (optionally pinned), or the first bytes of
    `out` (a contiguous uint8 CPU tensor; reusing buffers spares the page faults, and in VMs the
    host faults, of fresh memory)."""
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu" or out.numel() < nbytes:
        raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {nbytes} bytes")
    return out.view(-1)[:nbytes]


def read_tensor(info: TensorInfo, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from disk into a fresh CPU tensor (optionally pinned), or into the
    first bytes of `out` (a contiguous uint8 CPU tensor), which the result then shares."""
    buf = target_buffer(info.nbytes, pin, out)
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


class _Unmap:
    """munmap(2) of a mapping when the buffer that holds this goes (with the last tensor over it)."""

    def __init__(self, address: int, length: int):
        self.address, self.length = address, length

    def __del__(self):
        try:
            libc().munmap(self.address, self.length)
        except Exception:  # interpreter shutdown: the process is going anyway
            pass


def map_tensor(info: TensorInfo) -> torch.Tensor | None:
    """The tensor's bytes mapped from the page cache (private, copy-on-write) instead of copied
    into a buffer, or None: the file shorter than the header says, no mapping to be had (the file
    system refuses it), or its pages cannot be brought in (a read error). The caller then reads
    them, and a read names what is wrong.

    Why: a read copies every byte once more than the numerics need (on a 2-core EPYC VM the copy
    was 14 % of a conversion's CPU, mapping and unmapping the same pages about 11 %). Bytes not in
    the page cache are asked for first (POSIX_FADV_WILLNEED: the kernel sends their reads out at
    once, in large requests, as a large read(2) would), and the mapping's pages are then mapped in
    one call that waits for them. This works for any file we may read: it needs no mincore(2),
    whose answer is the truth only to whoever may write the file (a shared checkpoint owned by
    someone else was read into buffers for that). The mapping keeps no file descriptor, and is
    unmapped when the last tensor made from it goes; no consumer of the tensor can change the
    file through it. A file cut short while a tensor over it is read kills the process with
    SIGBUS, and so does a disk read error on a page the kernel dropped and must read again: the
    executor checks each piece's mappings (`mapping_intact`) just before the numerics read them
    and before an output that is a mapped input is written, which leaves the milliseconds those
    take; and mxconv's own command says what a bus error means (`native.note_sigbus`)."""
    if not info.nbytes or info.start % info.torch_dtype.itemsize:  # a view of another dtype needs alignment
        return None
    at = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    length = info.end - at
    try:
        c = libc()
        fd = os.open(info.file, os.O_RDONLY)
    except (OSError, AttributeError):
        return None
    try:
        if os.fstat(fd).st_size < info.end:  # mapped past the end, the bytes would raise SIGBUS, not an error
            return None
        try:
            os.posix_fadvise(fd, at, length, os.POSIX_FADV_WILLNEED)
        except OSError:  # advice only: the faults read what it would have
            pass
        address = map_file(fd, at, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if address is None:
        return None
    region = (ctypes.c_ubyte * length).from_address(address)
    region.unmap = _Unmap(address, length)  # torch holds `region` as long as any tensor over it lives
    # its pages in one call, which waits for those still being read (before Linux 5.14: EINVAL,
    # and they fault in as read). Any other failure (EFAULT: a disk read error, or the file cut
    # short since the fstat above) would be SIGBUS in the numerics: a read says what it is.
    if c.madvise(address, length, MADV_POPULATE_READ) != 0 and ctypes.get_errno() != errno.EINVAL:
        return None
    whole = torch.frombuffer(region, dtype=torch.uint8)
    return whole[info.start - at:].view(info.torch_dtype).reshape(info.shape)


def mapping_intact(address: int, length: int, file: Path, end: int) -> bool:
    """Whether the mapped range [address, address + length) of `file` can be read without SIGBUS:
    MADV_POPULATE_READ fails with EFAULT exactly where a read would raise it (the file cut short
    since, or a page that had to be read again failed to; pages already mapped cost a page-table
    walk). Where the kernel lacks it (before Linux 5.14), whether the file at that path still has
    `end` bytes."""
    try:
        c = libc()
        if c.madvise(address, length, MADV_POPULATE_READ) == 0:
            return True
        if ctypes.get_errno() == errno.EFAULT:
            return False
    except (OSError, AttributeError):
        pass
    try:
        return os.stat(file).st_size >= end
    except OSError:
        return False


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
