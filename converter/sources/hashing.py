"""sha256 of the source shards for the provenance file, computed in background threads.

Each file is hashed once the conversion has begun reading it (`release`), not before: on a real
checkpoint (hundreds of GB, more than the page cache) a hasher running ahead would read every
file from disk a second time by the time the conversion got there. Released that way, the hasher
and the conversion read the same file at about the same time, and the disk serves it once.

Deliberately free of torch: importing torch takes 1.3-2 s on a 2-core machine (3.6 s with a CUDA
build), and hashing a 3 GB source takes about as long on one core. A caller that starts hashing
before it imports torch (`start_early`) hides one behind the other; `SourceHasher.start` then
adopts the early result for the same, unchanged files instead of hashing them again.

Files already whole in the page cache (checked with mincore(2)) are queued at once instead, and
checked again when their turn comes (one evicted meanwhile waits for the conversion after all):
no disk reads them twice, and the hash no longer trails the conversion (a BF16 source whose last
file was released at the end kept the run waiting a second for it on a 2-core VM).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from converter.files import INDEX_FILE, SINGLE_FILE  # files.py imports nothing: still light
from converter.libc import libc, mincore_tells, resident
from converter.sources.hub_digests import recorded_sha256s

_CHUNK = 16 * 1024 * 1024
_WINDOW = 64 * 1024 * 1024  # a multiple of the page size (mmap offsets must be)

_early: dict[tuple[str, ...], "SourceHasher"] = {}
_early_lock = threading.Lock()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def cached(path: Path) -> bool:
    """Whether every page of the file is in the page cache (mincore(2) over a mapping of it);
    False where that cannot be told (mincore's answer would not be the truth, or it failed)."""
    try:
        c = libc()
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if not mincore_tells(Path(path), st):
                return False
            if not size:
                return True
            address = c.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return False
            try:
                return resident(address, size)
            finally:
                c.munmap(address, size)
    except (OSError, AttributeError):
        return False


class SourceHasher:
    """sha256 of every file, in a thread pool of half the cores (sha256 runs at about 1.8 GB/s per
    core with SHA-NI; that, not re-reading the page cache, is the cost: as much CPU as the
    conversion of a BF16 source, so a conversion at 8 GB/s needs 4-5 cores hashing beside it)."""

    def __init__(self, files: list[Path], threads: int | None = None, use_recorded: bool = True):
        self.requested = [Path(f) for f in files]
        # the Hub's own record, where a download left one (hub_digests.py): not hashed again
        self.recorded = recorded_sha256s(self.requested) if use_recorded else {}
        self.files = [p for p in self.requested if p.name not in self.recorded]
        self.lock = threading.Lock()
        self.hashes: dict[str, str] = dict(self.recorded)
        self.threads = threads or max(1, min(len(self.files), (os.cpu_count() or 1) // 2))
        self.pool: ThreadPoolExecutor | None = None
        self.futures: dict[Path, object] = {}
        self.stamps: dict[Path, tuple[int, int]] = {}
        self.released: set[Path] = set()  # by the conversion (or result()): to be hashed now, cached or not
        self.closed = False  # no more hashing ahead
        self.by_real: dict[Path, Path] = {}
        self.adopted: SourceHasher | None = None

    def release(self, path: Path) -> None:
        """The conversion is reading `path`: hash it now (a no-op for files not hashed here, or
        already queued). Files are hashed in the order they are released."""
        (self.adopted or self)._submit(Path(path))

    def release_all(self) -> None:
        for target in (self, self.adopted):
            if target is not None:
                for path in target.files:
                    target._submit(path)

    def _submit(self, path: Path, ahead: bool = False) -> None:
        """Queue `path` for hashing: released by the conversion, or `ahead` of it (found cached)."""
        path = self.by_real.get(path.resolve(), path)  # the caller may spell it otherwise (relative, a link)
        with self.lock:
            if not ahead:
                self.released.add(path)
            if self.pool is not None and path in self.stamps and path not in self.futures:
                try:
                    self.futures[path] = self.pool.submit(self._hash, path, ahead)
                except RuntimeError:  # shut down (an interrupted run): nothing more to hash
                    pass

    def _release_cached(self) -> None:
        """Queue now the files whose every page is cached (in file order): no disk read is
        duplicated, and the hash does not trail the conversion."""
        for path in self.files:
            if self.closed:
                return
            if path not in self.futures and cached(path):
                self._submit(path, ahead=True)

    def _hash(self, path: Path, ahead: bool = False) -> None:
        if ahead and not cached(path):  # evicted while queued (a source larger than memory)
            with self.lock:
                if path not in self.released:  # the conversion's release queues it again
                    del self.futures[path]
                    return
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:  # hashed in place in the page cache: reading into a buffer cost 15-25 % more CPU
                for at in range(0, size, _WINDOW):  # windows: mapped pages count in RSS until unmapped
                    with mmap.mmap(f.fileno(), min(_WINDOW, size - at), offset=at, access=mmap.ACCESS_READ) as m:
                        m.madvise(mmap.MADV_SEQUENTIAL)
                        with memoryview(m) as view:
                            h.update(view)  # releases the GIL: hashing runs beside the conversion
            except (OSError, ValueError):  # not mappable (some special file systems): read it
                h = hashlib.sha256()
                f.seek(0)
                buf = bytearray(_CHUNK)
                view = memoryview(buf)
                while n := f.readinto(buf):
                    h.update(view[:n])
        self.hashes[path.name] = h.hexdigest()

    def _launch(self) -> "SourceHasher":
        if self.files:
            self.stamps = {p: _stamp(p) for p in self.files}
            self.by_real = {p.resolve(): p for p in self.files}
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mxconv-hash")
            self.futures = {}  # filled by release(), in the order the conversion reads the files
            threading.Thread(target=self._release_cached, name="mxconv-hash-cached", daemon=True).start()
        return self

    def start(self) -> "SourceHasher":
        """Start hashing, or adopt a hasher that `start_early` began on the same files."""
        with _early_lock:
            early = _early.pop(tuple(str(p.resolve()) for p in self.requested), None)
        if early is not None:
            self.adopted = early
            return self
        return self._launch()

    def finished(self) -> dict[str, str]:
        """The hashes done so far, of files unchanged since hashing began; drops the pending
        ones (an interrupted conversion)."""
        target = self.adopted or self
        target.closed = True
        if target.pool is not None:
            target.pool.shutdown(wait=False, cancel_futures=True)
        done = {p for p, f in list(target.futures.items()) if f.done() and not f.cancelled() and f.exception() is None}
        return {**target.recorded, **{p.name: target.hashes[p.name] for p in done
                                      if p.name in target.hashes and _stamp(p) == target.stamps.get(p)}}

    def result(self) -> dict[str, str]:
        self.release_all()  # files the conversion never read (resumed runs, unused shards)
        if self.adopted is not None:
            try:
                hashes = self.adopted.result()
                if all(_stamp(p) == s for p, s in self.adopted.stamps.items()):
                    return hashes
            except Exception:  # the early run failed: hash again, and report errors from that
                pass
            self.adopted = None
            self._launch()
            self.release_all()
        self.closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            for f in self.futures.values():
                if f.exception() is not None:
                    from converter.errors import MxconvError

                    raise MxconvError(f"hashing the source failed: {f.exception()}")
        return dict(self.hashes)


def _available_memory() -> int:
    """MemAvailable in bytes (Linux), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def start_early(src: str | os.PathLike) -> None:
    """Begin hashing the shards of the checkpoint in `src` now (no torch needed). Best effort: a
    source that cannot be read this way is simply hashed later, by the conversion."""
    try:
        root = Path(src)
        if (root / INDEX_FILE).is_file():
            names = sorted({str(v) for v in json.loads((root / INDEX_FILE).read_text())["weight_map"].values()})
        elif (root / SINGLE_FILE).is_file():
            names = [SINGLE_FILE]
        else:
            return
        files = [root / n for n in names]
        if not all(f.is_file() and Path(n).name == n for f, n in zip(files, names)):
            return
        hasher = SourceHasher(files)._launch()
        # While torch imports, the first shards (where the conversion starts) as far as a quarter
        # of the free memory: the page cache still holds them when the conversion gets there.
        room, ahead = _available_memory() // 4, 0
        for f in hasher.files:
            if ahead and ahead + hasher.stamps[f][0] > room:
                break
            hasher.release(f)
            ahead += hasher.stamps[f][0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    with _early_lock:
        _early[tuple(str(p.resolve()) for p in files)] = hasher


def sha256_files(files: list[Path], checkpoint_files: list[Path]) -> dict[str, str]:
    """sha256 of `files` (by name), now: a resume's check of files that may have changed. Uses
    the `start_early` hasher of the same checkpoint (`checkpoint_files`) when there is one, so
    no file is hashed twice; otherwise hashes in a pool of its own."""
    with _early_lock:
        early = _early.get(tuple(str(p.resolve()) for p in checkpoint_files))
    got: dict[str, str] = {}
    if early is not None and early.pool is not None:
        wanted = {early.by_real.get(Path(p).resolve(), Path(p)) for p in files}
        mine = {p for p in wanted if p in early.stamps}  # the early hasher's (not Hub-recorded ones)
        for path in mine:
            early.release(path)
        try:
            for path, future in list(early.futures.items()):
                if path in mine:
                    future.result()
            got = {p.name: early.hashes[p.name] for p in mine if _stamp(p) == early.stamps.get(p)}
        except Exception:  # the early hash failed: hash again below
            got = {}
        files = [p for p in wanted if p.name not in got]
        if not files:
            return got
    hasher = SourceHasher(files, use_recorded=False)._launch()  # a freshness check computes, trusts nothing
    return {**got, **hasher.result()}
