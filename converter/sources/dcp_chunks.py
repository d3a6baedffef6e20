"""Reading tensor chunks out of PyTorch DCP `.distcp` files, and any row range of a global tensor
assembled from the chunks that overlap it.

Each chunk is a record (file, offset, length) holding an uncompressed `torch.save` zip. Its zip
central directory gives the members; `data.pkl` (restricted unpickler) gives the chunk's storage
offset and strides; the raw little-endian bytes of `data/<key>` are read with positioned reads,
only the part a request needs, straight into the caller's buffer where the layout allows (else
into a temporary the size of that part: a column chunk's rows are scattered into their places
by one `preadv`, a chunk saved with other strides is read run by run in its storage order).
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import SourceError
from converter.sources.unpickle import load_chunk_record

_EOCD, _EOCD64_LOC, _CENTRAL, _LOCAL = b"PK\x05\x06", b"PK\x06\x07", b"PK\x01\x02", b"PK\x03\x04"
_TAIL = 1 << 16  # the end of a record read to find its zip directory (torch writes no comment)


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a global tensor: a box at `offsets` of `sizes`, and its record."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int
    length: int
    raw: bool = False  # the record is the bytes themselves, row-major (Hugging Face DCP safetensors)


@dataclass(frozen=True)
class _Located:
    data: int  # absolute file offset of the chunk's storage bytes
    storage_offset: int  # elements
    strides: tuple[int, ...]
    contiguous: bool


def _pread(fd: int, view: memoryview, at: int, file: Path, tensor: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], at + got)
        except OSError as e:
            raise SourceError(f"read failed: {e.strerror}", file=file, tensor=tensor) from e
        if n <= 0:
            raise SourceError(f"file ended after {at + got} bytes (truncated .distcp)", file=file, tensor=tensor)
        got += n


def _pread_rows(fd: int, views: list[memoryview], at: int, file: Path, tensor: str) -> None:
    """Fill `views` in order from consecutive file bytes starting at `at` (one scatter read per
    1024 of them: a column chunk's rows land straight in their places in a row piece)."""
    i, pos = 0, at
    while i < len(views):
        try:
            n = os.preadv(fd, views[i:i + 1024], pos)
        except OSError as e:
            raise SourceError(f"read failed: {e.strerror}", file=file, tensor=tensor) from e
        if n <= 0:
            raise SourceError(f"file ended after {pos} bytes (truncated .distcp)", file=file, tensor=tensor)
        pos += n
        while n and i < len(views):
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i], n = views[i][n:], 0


def _read(fd: int, at: int, n: int, file: Path, tensor: str) -> bytes:
    buf = bytearray(n)
    _pread(fd, memoryview(buf), at, file, tensor)
    return bytes(buf)


def _zip_members(fd: int, chunk: Chunk, tensor: str) -> dict[str, tuple[int, int, int]]:
    """name -> (local header offset, compressed size, method) from the record's central directory."""
    def bad(why):
        return SourceError(f"chunk record at byte {chunk.offset} is not a torch.save archive: {why}",
                           file=chunk.file, tensor=tensor)

    tail_len = min(chunk.length, _TAIL)
    tail = _read(fd, chunk.offset + chunk.length - tail_len, tail_len, chunk.file, tensor)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        raise bad("no end of central directory")
    count, cd_size, cd_off = struct.unpack_from("<HII", tail, at + 10)
    if 0xFFFFFFFF in (cd_size, cd_off) or count == 0xFFFF:
        loc = at - 20
        if loc < 0 or tail[loc:loc + 4] != _EOCD64_LOC:
            raise bad("zip64 directory without its locator")
        (eocd64,) = struct.unpack_from("<Q", tail, loc + 8)
        rec = _read(fd, chunk.offset + eocd64, 56, chunk.file, tensor)
        if rec[:4] != b"PK\x06\x06":
            raise bad("bad zip64 end of central directory")
        count, cd_size, cd_off = struct.unpack_from("<QQQ", rec, 32)
    if cd_off + cd_size > chunk.length or cd_size > 1 << 24:
        raise bad("central directory outside the record")
    cd = _read(fd, chunk.offset + cd_off, cd_size, chunk.file, tensor)
    members, pos = {}, 0
    for _ in range(count):
        if cd[pos:pos + 4] != _CENTRAL:
            raise bad("damaged central directory")
        method, csize, usize, nlen, xlen, clen = struct.unpack_from("<HxxxxxxxxIIHHH", cd, pos + 10)
        (lho,) = struct.unpack_from("<I", cd, pos + 42)
        name = cd[pos + 46:pos + 46 + nlen].decode("utf-8", "replace")
        extra = cd[pos + 46 + nlen:pos + 46 + nlen + xlen]
        if 0xFFFFFFFF in (csize, usize, lho):  # zip64 extra field: the 8-byte values, in this order
            x = 0
            while x + 4 <= len(extra):
                xid, xl = struct.unpack_from("<HH", extra, x)
                if xid == 1:
                    vals, k = [], x + 4
                    for v in (usize, csize, lho):
                        if v == 0xFFFFFFFF:
                            vals.append(struct.unpack_from("<Q", extra, k)[0])
                            k += 8
                        else:
                            vals.append(v)
                    usize, csize, lho = vals
                x += 4 + xl
        if csize != usize and method == 0:
            raise bad(f"member {name} has inconsistent sizes")
        members[name] = (lho, csize, method)
        pos += 46 + nlen + xlen + clen
    return members


def _member_data(fd: int, chunk: Chunk, members: dict, suffix: str, tensor: str) -> tuple[int, int]:
    """(absolute offset, size) of the stored member whose name ends with `suffix`."""
    names = [n for n in members if "/" in n and n.split("/", 1)[1] == suffix]
    if len(names) != 1:
        raise SourceError(f"chunk record at byte {chunk.offset} has no member */{suffix}",
                          file=chunk.file, tensor=tensor)
    lho, size, method = members[names[0]]
    if method != 0:
        raise SourceError(f"member {names[0]} of the chunk record at byte {chunk.offset} is compressed "
                          f"(method {method}); mxconv reads stored members only", file=chunk.file, tensor=tensor)
    head = _read(fd, chunk.offset + lho, 30, chunk.file, tensor)
    if head[:4] != _LOCAL:
        raise SourceError(f"member {names[0]} has no local header", file=chunk.file, tensor=tensor)
    nlen, xlen = struct.unpack_from("<HH", head, 26)
    start = lho + 30 + nlen + xlen
    if start + size > chunk.length:
        raise SourceError(f"member {names[0]} ends past its chunk record (truncated?)", file=chunk.file,
                          tensor=tensor)
    return chunk.offset + start, size


def contiguous_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for s in reversed(sizes):
        out.append(step)
        step *= s
    return tuple(reversed(out))


class ChunkReader:
    """Locates chunk data (once per chunk, cached) and copies boxes of chunks into tensors."""

    def __init__(self):
        self.lock = threading.Lock()
        self.located: dict[tuple, _Located] = {}

    def __getstate__(self) -> dict:  # a view is sent to conversion processes pickled: its chunks
        with self.lock:              # located so far go with it, a lock of its own is made there
            return {"located": dict(self.located)}

    def __setstate__(self, state: dict) -> None:
        self.lock = threading.Lock()
        self.located = state["located"]

    def locate(self, fd: int, chunk: Chunk, dtype: torch.dtype, tensor: str) -> _Located:
        key = (chunk.file, chunk.offset)
        with self.lock:
            found = self.located.get(key)
        if found is not None:
            return found
        if chunk.raw:
            return _Located(chunk.offset, 0, contiguous_strides(chunk.sizes), True)
        members = _zip_members(fd, chunk, tensor)
        pkl_at, pkl_len = _member_data(fd, chunk, members, "data.pkl", tensor)
        if pkl_len > 1 << 20:
            raise SourceError(f"data.pkl of {pkl_len} bytes is not a tensor record", file=chunk.file, tensor=tensor)
        rec = load_chunk_record(_read(fd, pkl_at, pkl_len, chunk.file, tensor), chunk.file, tensor)
        if not isinstance(rec.storage, tuple) or len(rec.storage) != 3:
            raise SourceError("tensor record without a storage", file=chunk.file, tensor=tensor)
        sdtype, key_name, numel = rec.storage
        where = f"chunk at {list(chunk.offsets)} (record at byte {chunk.offset})"
        if sdtype != dtype:
            raise SourceError(f"{where} holds {sdtype}, .metadata says {dtype}", file=chunk.file, tensor=tensor)
        if rec.size != chunk.sizes:
            raise SourceError(f"{where} holds shape {list(rec.size)}, .metadata says {list(chunk.sizes)}",
                              file=chunk.file, tensor=tensor)
        if len(rec.stride) != len(rec.size) or any(s < 0 for s in rec.stride) or rec.offset < 0:
            raise SourceError(f"{where} has unusable strides {list(rec.stride)}", file=chunk.file, tensor=tensor)
        data_at, data_len = _member_data(fd, chunk, members, f"data/{key_name}", tensor)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if data_len != numel * itemsize:
            raise SourceError(f"{where}: storage of {numel} elements but {data_len} bytes", file=chunk.file,
                              tensor=tensor)
        if math.prod(rec.size) and rec.offset + sum((s - 1) * st for s, st in zip(rec.size, rec.stride)) >= numel:
            raise SourceError(f"{where}: strides {list(rec.stride)} reach past its storage", file=chunk.file,
                              tensor=tensor)
        contiguous = all(st == c for s, st, c in zip(rec.size, rec.stride, contiguous_strides(rec.size)) if s > 1)
        found = _Located(data_at, rec.offset, rec.stride, contiguous)
        with self.lock:
            self.located[key] = found
        return found

    def copy_box(self, fd: int, chunk: Chunk, dtype: torch.dtype, tensor: str, lo: tuple, hi: tuple,
                 dest: torch.Tensor, dest_buf: torch.Tensor) -> None:
        """Copy the part [lo, hi) (global coordinates, inside `chunk`) into `dest` (a view of the
        uint8 buffer `dest_buf`, shaped hi - lo)."""
        loc = self.locate(fd, chunk, dtype, tensor)
        itemsize = dest.element_size()
        rel = [a - o for a, o in zip(lo, chunk.offsets)]
        shape = [b - a for a, b in zip(lo, hi)]
        first = loc.storage_offset + sum(r * st for r, st in zip(rel, loc.strides))
        last = loc.storage_offset + sum((r + s - 1) * st for r, s, st in zip(rel, shape, loc.strides))
        span = last - first + 1
        if loc.contiguous and span == dest.numel() and (dest.is_contiguous() or dest.stride()[-1] == 1):
            at = dest.data_ptr() - dest_buf.data_ptr()
            whole = memoryview(dest_buf.numpy())
            if dest.is_contiguous():
                _pread(fd, whole[at:at + span * itemsize], loc.data + first * itemsize, chunk.file, tensor)
                return
            row = shape[-1] * itemsize  # rows of a column chunk: scattered straight into their places
            starts = torch.zeros((), dtype=torch.int64)
            for size, stride in zip(dest.shape[:-1], dest.stride()[:-1]):
                starts = starts[..., None] + torch.arange(size) * stride
            views = [whole[at + o * itemsize:at + o * itemsize + row] for o in starts.reshape(-1).tolist()]
            _pread_rows(fd, views, loc.data + first * itemsize, chunk.file, tensor)
            return
        if loc.contiguous:  # a contiguous span, into a row piece that is not: one copy
            tmp = torch.empty(span * itemsize, dtype=torch.uint8)
            _pread(fd, memoryview(tmp.numpy()), loc.data + first * itemsize, chunk.file, tensor)
            dest.copy_(tmp.view(dtype).view(shape))
            return
        # saved with other strides (a clone of a transposed view): read the box's runs along the
        # stride-1 dim in storage order, exactly its bytes, then put them in place with one copy
        order = sorted(range(len(shape)), key=lambda k: -loc.strides[k])
        inner = order[-1]
        tmp = torch.empty(dest.numel() * itemsize, dtype=torch.uint8)
        run = shape[inner] * itemsize if loc.strides[inner] == 1 else itemsize
        starts = torch.full((), first, dtype=torch.int64)
        for k in order if run == itemsize else order[:-1]:
            starts = starts[..., None] + torch.arange(shape[k]) * loc.strides[k]
        whole, pos = memoryview(tmp.numpy()), 0
        for start in starts.reshape(-1).tolist():
            _pread(fd, whole[pos:pos + run], loc.data + start * itemsize, chunk.file, tensor)
            pos += run
        stored = tmp.view(dtype).view([shape[k] for k in order])
        dest.copy_(stored.permute([order.index(k) for k in range(len(shape))]))


def flat_boxes(shape: tuple[int, ...], e0: int, e1: int) -> list[tuple[int, tuple, tuple]]:
    """The elements [e0, e1) of a row-major `shape` as boxes: (first element, lo, hi), in order."""
    if not shape:
        return [(0, (), ())] if e1 > e0 else []
    strides = contiguous_strides(shape)
    out = []

    def unravel(e):
        return tuple((e // st) % s for st, s in zip(strides, shape))

    pos = e0
    while pos < e1:
        idx = unravel(pos)
        k = len(shape) - 1  # widen to outer dims while the inner indices are zero and a step fits
        while k > 0 and idx[k] == 0 and pos + strides[k - 1] <= e1:
            k -= 1
        count = min((e1 - pos) // strides[k], shape[k] - idx[k])
        lo = idx[:k] + (idx[k],) + (0,) * (len(shape) - k - 1)
        hi = tuple(i + 1 for i in idx[:k]) + (idx[k] + count,) + tuple(shape[k + 1:])
        out.append((pos - e0, lo, hi))
        pos += count * strides[k]
    return out
