"""Positional writes of one file of known size through O_DIRECT, bypassing the page cache.

Why: writing a converted shard through the page cache costs a memcpy into freshly allocated
cache pages for every output byte, and on the machines we measured (2-core VMs) that was the
largest single cost of a conversion (about 1.7 s of CPU per GB, more than all the numerics).
With O_DIRECT the disk reads our buffers by DMA: close to zero CPU, and the final fsync has
nothing left to flush.

O_DIRECT needs the memory address, the file offset and the length of every write aligned to the
device's logical block (4096 bytes covers every common device). Tensors sit at arbitrary offsets
in a shard, so each write is split: the aligned interior goes straight from the caller's memory
(when its address has the same phase modulo 4096 as its file offset; callers that allocate
buffers can arrange that through `phase`) or through a bounce buffer, and the unaligned edges are
assembled in 4 KB blocks that are written once every byte of them has arrived. The last block is
written whole and the file truncated to its size at the end.

Where O_DIRECT is unavailable (tmpfs before Linux 6.6, macOS, some network file systems)
`open_direct` returns None and the caller writes through the page cache as before. A file system
in memory (`in_memory_fs`: tmpfs, ramfs) has no disk to bypass: the shard writer uses plain
write(2) there (or, writing one shard at a time with many threads, a shared mapping).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

import torch

from converter.libc import libc

ALIGN = 4096
_BOUNCE_BYTES = 8 << 20


def phase(offset: int) -> int:
    """Where, modulo ALIGN, a buffer written at file `offset` should start for zero-copy writes."""
    return offset % ALIGN


_MEMORY_FS = {"tmpfs", "ramfs"}
MADV_DONTNEED = 4  # Linux's value


def madvise(address: int, length: int, advice: int) -> bool:
    """madvise(2) on the pages covering [address, address + length), through ctypes, which lets
    other threads run meanwhile (Python's mmap.madvise holds the GIL). False where the call is
    unsupported or fails."""
    try:
        start = address - address % mmap.PAGESIZE
        return libc().madvise(start, address + length - start, advice) == 0
    except (OSError, AttributeError):
        return False


def in_memory_fs(path: str | os.PathLike) -> bool:
    """Whether `path` lies on a file system in memory (the mount with the longest matching mount
    point in /proc/self/mounts; False where that cannot be read)."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[2]
        return fstype in _MEMORY_FS
    except OSError:
        return False


def _aligned(nbytes: int) -> tuple[memoryview, torch.Tensor]:
    """nbytes of memory starting on an ALIGN boundary, as a buffer for os.pwrite and a tensor.
    Cut from a slightly larger tensor, not mapped: an mmap per 4 KB edge block (two a piece)
    took the process's mmap lock for writing each time, against every other thread's page faults."""
    base = torch.zeros(nbytes + ALIGN, dtype=torch.uint8)  # zeros: an edge block's gaps stay zero
    skip = -base.data_ptr() % ALIGN
    t = base[skip:skip + nbytes]
    return memoryview(t.numpy()), t


class DirectFile:
    """One file opened with O_DIRECT; `write` may be called from several threads at once for
    disjoint ranges. `close` flushes partially covered blocks, truncates to `size` and fsyncs."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.partial: dict[int, list] = {}  # block index -> [buffer, tensor view, bytes covered]
        self.lock = threading.Lock()
        self.local = threading.local()

    def _bounce(self) -> torch.Tensor:
        if getattr(self.local, "bounce", None) is None:
            self.local.keep, self.local.bounce = _aligned(_BOUNCE_BYTES)
        return self.local.bounce

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def write(self, data: torch.Tensor, offset: int) -> None:
        """Write the bytes of the contiguous uint8 CPU tensor `data` at `offset`."""
        n = data.numel()
        end = offset + n
        a0 = min(-(-offset // ALIGN) * ALIGN, end)
        a1 = max(end // ALIGN * ALIGN, a0)
        if a1 > a0:
            inner = data[a0 - offset:a1 - offset]
            if inner.data_ptr() % ALIGN == 0:
                self._pwrite_all(memoryview(inner.numpy()), a0)
            else:  # the caller's memory has the wrong phase: through an aligned bounce buffer
                bounce = self._bounce()
                for pos in range(0, a1 - a0, _BOUNCE_BYTES):
                    k = min(_BOUNCE_BYTES, a1 - a0 - pos)
                    bounce[:k].copy_(inner[pos:pos + k])
                    self._pwrite_all(memoryview(bounce[:k].numpy()), a0 + pos)
        if a0 > offset:
            self._edge(data[:a0 - offset], offset)
        if end > a1 and a1 >= a0:
            self._edge(data[a1 - offset:], a1)

    def _block_len(self, block: int) -> int:
        return min(ALIGN, self.size - block * ALIGN)

    def _edge(self, piece: torch.Tensor, offset: int) -> None:
        """Bytes inside one block; the block is written when all of its bytes have come."""
        block, start = divmod(offset, ALIGN)
        with self.lock:
            entry = self.partial.get(block)
            if entry is None:
                entry = self.partial[block] = [*_aligned(ALIGN), 0]
            entry[1][start:start + piece.numel()].copy_(piece)
            entry[2] += piece.numel()
            if entry[2] < self._block_len(block):
                return
            del self.partial[block]
        self._pwrite_all(memoryview(entry[0]), block * ALIGN)  # whole block; close() truncates

    def close(self) -> None:
        """Write what is left (blocks with gaps keep zeros there), cut the last block's padding, fsync."""
        for block, entry in sorted(self.partial.items()):
            self._pwrite_all(memoryview(entry[0]), block * ALIGN)
        self.partial.clear()
        self.local = threading.local()  # drop the per-thread bounce buffers with the file
        os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)


def open_direct(path: str | os.PathLike, size: int) -> DirectFile | None:
    """A new file of `size` bytes (zeros) for O_DIRECT writes, or None where that is unsupported."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    try:
        os.ftruncate(fd, size)
        probe = _aligned(ALIGN)  # some file systems accept the flag at open and refuse the write
        os.pwrite(fd, memoryview(probe[0]), 0)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return DirectFile(fd, size)
