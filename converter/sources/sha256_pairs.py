"""sha256 of files two at a time on one core, for the source hasher (`hashing.py`).

A sha256 is a chain: each 64-byte block's rounds wait for the block before, and each round for
the one before it. With the x86 SHA extensions one chain leaves most of the core idle, so the
compiled compression (`numerics/sha256.c`) runs two files' chains interleaved: 3.3 GB/s of the
two together on a 2-core AMD EPYC VM against 1.8 for one file (hashlib's, OpenSSL's), 2.3
against 1.9 on an Intel Xeon (Emerald Rapids). The hasher pairs files only where more files wait
than it has threads free to take them: paired, each file takes longer to finish.

Files are read through windows mapped from the page cache (each window's pages mapped in one
madvise), as hashlib is given them (`hashing.py`): reading into a buffer costs a copy. Padding
and the digest are FIPS 180-4's, here; the tests compare every digest with hashlib's. Free of
torch, like the hasher.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Callable

from converter.libc import MADV_POPULATE_READ, libc, map_file

WINDOW = 16 << 20  # bytes of a file mapped at a time (a multiple of the page size): RSS stays bounded
# sha256's initial state H0..H7 (FIPS 180-4)
H0 = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)

Compress = Callable[..., int]  # mx_sha256_blocks(state_a, a, state_b | None, b | None, nblocks)


def compressor() -> Compress | None:
    """The compiled two-message compression, or None where there is none (no C compiler,
    MXCONV_NATIVE=0, a CPU without the SHA extensions) or where MXCONV_SHA=hashlib asks for
    hashlib (a bench knob: on one lent Intel Xeon VM OpenSSL ran one file's chain about 10 %
    faster than these rounds, on another as fast): the hasher uses hashlib then, one file each."""
    if os.environ.get("MXCONV_SHA") == "hashlib":
        return None
    from converter.numerics import native

    lib = native.load()
    if lib is None:
        return None
    fn = lib.mx_sha256_blocks
    return fn if fn((ctypes.c_uint32 * 8)(*H0), None, None, None, 0) == 0 else None


class Message:
    """One file's sha256 on its way: the state, how far it has got, the window mapped now."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise
        self.pos = 0
        self.state = (ctypes.c_uint32 * 8)(*H0)
        self.address: int | None = None
        self.start = self.length = 0

    def span(self) -> tuple[int, int]:
        """(address, length) of the whole blocks mapped from `pos` on, mapping the next window
        once the current one is used up; length 0 once only the last, partial block is left.
        OSError where the file cannot be mapped, or is found cut short as a window is mapped
        (Linux 5.14 and later; a cut inside a mapped window ends the process with SIGBUS, as
        hashlib's windows in `hashing.py` would)."""
        left = (self.size - self.pos) // 64 * 64
        if not left:
            return 0, 0
        if self.address is None or self.pos >= self.start + self.length:
            self._unmap()
            length = min(WINDOW, self.size - self.pos)  # windows start at multiples of WINDOW
            address = map_file(self.fd, self.pos, length)
            if address is None:
                raise OSError(ctypes.get_errno(), f"cannot map {self.path}")
            self.address, self.start, self.length = address, self.pos, length
            if libc().madvise(address, length, MADV_POPULATE_READ) != 0 and ctypes.get_errno() == errno.EFAULT:
                raise OSError(errno.EIO, f"{self.path} was cut short while it was hashed")
        return self.address + self.pos - self.start, min(self.start + self.length - self.pos, left)

    def finish(self, compress: Compress) -> str:
        """The digest, from the last partial block and the padding; closes the file. OSError
        where the file has been cut short."""
        try:
            tail = os.pread(self.fd, self.size - self.pos, self.pos)
            if len(tail) != self.size - self.pos:
                raise OSError(errno.EIO, f"{self.path} was cut short while it was hashed")
            padded = tail + b"\x80" + bytes((55 - len(tail)) % 64) + struct.pack(">Q", self.size * 8)
            compress(self.state, ctypes.create_string_buffer(padded, len(padded)), None, None, len(padded) // 64)
            return struct.pack(">8I", *self.state).hex()
        finally:
            self.close()

    def close(self) -> None:
        """Unmap and close; never raises (a read-only file's close has nothing to report)."""
        self._unmap()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _unmap(self) -> None:
        if self.address is not None:
            libc().munmap(self.address, self.length)
            self.address = None


def step(messages: list[Message], compress: Compress) -> list[Message]:
    """Hash the next span of one or two messages (as many bytes of each: the shorter span, up to
    a window). Returns the messages with only their last partial block left, for `finish`."""
    spans = [m.span() for m in messages]
    live = [(m, address, n) for m, (address, n) in zip(messages, spans) if n]
    if live:
        n = min(length for _, _, length in live)
        (a, pa, _), *rest = live
        if rest:
            b, pb, _ = rest[0]
            compress(a.state, pa, b.state, pb, n // 64)
            b.pos += n
        else:
            compress(a.state, pa, None, None, n // 64)
        a.pos += n
    return [m for m, (_, n) in zip(messages, spans) if not n]
