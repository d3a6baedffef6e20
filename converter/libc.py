"""The C library through ctypes, for the calls Python lacks or makes while holding the GIL:
madvise (Python's mmap.madvise holds the GIL), mincore (not in Python), the mmap/munmap by
address that mincore needs (`map_file`), memcmp (10x torch.equal on bytes, for verify), memory
for a pthread mutex the compiled kernels take (`Mutex`), prctl; and, on top of mincore, whether
a mapped range is all in memory and whether the kernel tells us so for a file.
Free of torch: the source hasher uses it before torch is imported."""

from __future__ import annotations

import ctypes
import mmap
import os

_lib: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The process's C library with the argument types of the calls above; OSError or
    AttributeError where there is none or it lacks one (callers treat that as "cannot tell")."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(None, use_errno=True)
        p, size = ctypes.c_void_p, ctypes.c_size_t
        lib.madvise.argtypes = [p, size, ctypes.c_int]
        lib.mmap.restype = p
        lib.mmap.argtypes = [p, size, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [p, size]
        lib.mincore.argtypes = [p, size, p]
        lib.memcmp.argtypes = [p, p, size]
        try:
            lib.pthread_mutex_lock.argtypes = lib.pthread_mutex_unlock.argtypes = [p]
        except AttributeError:  # (a C library without them: `Mutex` says so)
            pass
        _lib = lib
    return _lib


MADV_POPULATE_READ = 22  # Linux 5.14: map a range's pages in one call (no fault per page)
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_file(fd: int, offset: int, length: int, prot: int = mmap.PROT_READ, flags: int = mmap.MAP_SHARED) -> int | None:
    """mmap(2) of `length` bytes of `fd` from `offset` (a multiple of the page size): the address,
    or None where the file cannot be mapped (errno says why). munmap it with libc().munmap."""
    address = libc().mmap(None, length, prot, flags, fd, offset)
    return None if address in (None, _MAP_FAILED) else address


_LOW_BIT = bytes(i & 1 for i in range(256))


def resident(address: int, length: int) -> bool:
    """Whether every page of the mapped range [address, address + length) is in memory (mincore(2);
    bit 0 of each byte of its answer). False where that cannot be told. For a mapped file, the
    answer is the truth only to whoever may write the file (see mincore_tells)."""
    try:
        c = libc()
        start = address - address % mmap.PAGESIZE
        pages = (address + length - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if c.mincore(start, address + length - start, vec) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return bytes(vec).translate(_LOW_BIT).count(0) == 0


def mincore_tells(path: os.PathLike, st: os.stat_result) -> bool:
    """Whether mincore(2) reports this file's real residency to us: since Linux 5.2 it does only
    for the file's owner, for whoever may write it, and for a capable user (root); to anyone
    else it reports every page as resident (a side channel it closes that way)."""
    euid = os.geteuid()
    effective = os.access in os.supports_effective_ids
    return euid == 0 or st.st_uid == euid or os.access(path, os.W_OK, effective_ids=effective)


class Mutex:
    """A pthread mutex in memory of its own, for C code given its `address` (the compiled kernels
    take it around their writes): zeroed memory is an unlocked default mutex
    (PTHREAD_MUTEX_INITIALIZER is all zeros in glibc and musl). AttributeError where the C library
    has no pthread mutex to take it with."""

    def __init__(self):
        if not hasattr(libc(), "pthread_mutex_lock"):
            raise AttributeError("this C library has no pthread_mutex_lock")
        self.memory = ctypes.create_string_buffer(64)  # sizeof(pthread_mutex_t): 40 on x86-64, 48 on aarch64
        self.address = ctypes.addressof(self.memory)
