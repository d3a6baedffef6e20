"""The C library through ctypes, for the calls Python lacks or makes while holding the GIL:
madvise (Python's mmap.madvise holds the GIL), mincore (not in Python), the mmap/munmap by
address that mincore needs, and memcmp (10x torch.equal on bytes, for verify). Free of torch:
the source hasher uses it before torch is imported."""

from __future__ import annotations

import ctypes

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
        _lib = lib
    return _lib
