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

The threads (half the cores) take the files in the order they are queued, one each. Where more
files wait than threads are free to take them (a real checkpoint's hundreds of shards; any
source on 2 cores), a thread takes a second file and hashes the two at once on its core
(`sha256_pairs.py`, with the compiled SHA-NI rounds): about half the CPU per byte on AMD EPYC, a
sixth less on Intel Xeon. Without the compiled library, files are hashed with hashlib, one each.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from converter.files import INDEX_FILE, SINGLE_FILE  # files.py imports nothing: still light
from converter.libc import libc, map_file, mincore_tells, resident
from converter.sources import sha256_pairs
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
            address = map_file(f.fileno(), 0, size)
            if address is None:
                return False
            try:
                return resident(address, size)
            finally:
                c.munmap(address, size)
    except (OSError, AttributeError):
        return False


class SourceHasher:
    """sha256 of every file, in threads of half the cores (sha256 runs at 1.4-1.9 GB/s per core
    with SHA-NI; that, not re-reading the page cache, is the cost: about as much CPU as the
    conversion of an FP8 source, so a conversion at 8 GB/s needs 4-5 cores hashing beside it)."""

    def __init__(self, files: list[Path], threads: int | None = None, use_recorded: bool = True):
        self.requested = [Path(f) for f in files]
        # the Hub's own record, where a download left one (hub_digests.py): not hashed again
        self.recorded = recorded_sha256s(self.requested) if use_recorded else {}
        self.files = [p for p in self.requested if p.name not in self.recorded]
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.hashes: dict[str, str] = dict(self.recorded)
        # half the cores unless told (MXCONV_HASH_THREADS), never more than there are files
        wanted = int(os.environ.get("MXCONV_HASH_THREADS", 0)) or (os.cpu_count() or 1) // 2
        self.threads = threads or max(1, min(len(self.files), wanted))
        self.started = False  # threads may run (`_launch`)
        self.pending: deque[tuple[Path, bool]] = deque()  # queued, not taken yet: (path, ahead)
        self.running = self.idle = self.busy = 0  # threads started, waiting, holding a file
        self.stopping = False  # threads leave once nothing is queued
        self.futures: dict[Path, Future] = {}
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
            if self.started and not self.stopping and path in self.stamps and path not in self.futures:
                self.futures[path] = Future()
                self.pending.append((path, ahead))
                if self.idle:
                    self.wake.notify()
                # more queued than waiting threads (a woken one counts as waiting until it runs): one more
                if len(self.pending) > self.idle and self.running < self.threads:
                    self.running += 1
                    threading.Thread(target=self._work, name="mxconv-hash", daemon=True).start()

    def _release_cached(self) -> None:
        """Queue now the files whose every page is cached (in file order): no disk read is
        duplicated, and the hash does not trail the conversion."""
        for path in self.files:
            if self.closed:
                return
            if path not in self.futures and cached(path):
                self._submit(path, ahead=True)

    def _next(self, holding: int) -> tuple[Path, bool, Future] | None:
        """The next queued file for a thread that holds `holding` files: it waits for one if it
        holds none (None: the hasher is stopping), and takes a second only where more files are
        queued than threads are free to take them."""
        with self.lock:
            if not holding:
                self.idle += 1
                while not self.pending and not self.stopping:
                    self.wake.wait()
                self.idle -= 1
                if not self.pending:
                    self.running -= 1
                    return None
            elif len(self.pending) <= self.threads - self.busy:
                return None
            path, ahead = self.pending.popleft()
            self.busy += not holding
            future = self.futures[path]
            future.set_running_or_notify_cancel()
            return path, ahead, future

    def _begin(self, path: Path, ahead: bool) -> bool:
        """Whether to hash `path` now: not if it was queued ahead of the conversion and has been
        evicted since (a source larger than memory): the conversion's release queues it again."""
        if ahead and not cached(path):
            with self.lock:
                if path not in self.released:
                    del self.futures[path]
                    return False
        return True

    def _work(self) -> None:
        """A hashing thread: one file at a time with hashlib, or, with the compiled rounds, one or
        two `sha256_pairs.Message`s at once."""
        held: list[tuple[sha256_pairs.Message, Future]] = []
        try:
            self._hash_files(held)
        except BaseException as e:  # a bug: the files not hashed yet fail with it (result() raises)
            with self.lock:         # rather than wait for a thread that is gone
                self.stopping = True
                queued = [self.futures[path] for path, _ in self.pending]
                self.pending.clear()
                self.wake.notify_all()
            for future in [f for _, f in held] + queued:
                if not future.done():
                    future.set_exception(e)
            for m, _ in held:
                m.close()

    def _hash_files(self, held: list) -> None:
        compress = sha256_pairs.compressor()
        while True:
            if len(held) < (2 if compress else 1):
                got = self._next(len(held))
                if got is None and not held:
                    return
                if got is not None:
                    try:
                        self._take(*got, held, compress)
                    except BaseException as e:  # (taken from the queue, not held yet: failed here)
                        if not got[2].done():
                            got[2].set_exception(e)
                        raise
                    if not held:  # hashed at once (hashlib), or not to be hashed now
                        self._holds_none()
                    continue  # a second one, where files wait
            try:
                ended = sha256_pairs.step([m for m, _ in held], compress)
            except Exception:  # a window that cannot be mapped: each file again, with hashlib
                for m, future in held:
                    m.close()
                    self._settle(future, self._hash_alone, m.path)
                held.clear()
                ended = []
            for m in ended:
                future = next(f for n, f in held if n is m)
                try:
                    digest = m.finish(compress)
                except OSError:  # cut short meanwhile: hashlib hashes what is there (the run sees the change)
                    digest = None
                held.remove((m, future))
                if digest is None:
                    self._settle(future, self._hash_alone, m.path)
                else:
                    self._record(m.path, digest)
                    future.set_result(None)
            if not held:
                self._holds_none()

    def _take(self, path: Path, ahead: bool, future: Future, held: list, compress) -> None:
        if not self._begin(path, ahead):
            future.set_result(None)
        elif compress is None:
            self._settle(future, self._hash_alone, path)
        else:
            try:
                held.append((sha256_pairs.Message(path), future))
            except OSError:  # hashlib says how it fails (or reads it after all)
                self._settle(future, self._hash_alone, path)

    def _holds_none(self) -> None:
        with self.lock:
            self.busy -= 1

    def _settle(self, future: Future, hash_one, path: Path) -> None:
        try:
            hash_one(path)
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(None)

    def _record(self, path: Path, digest: str) -> None:
        self.hashes[path.name] = digest

    def _hash_alone(self, path: Path) -> None:
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
        self._record(path, h.hexdigest())

    def _launch(self) -> "SourceHasher":
        if self.files:
            self.stamps = {p: _stamp(p) for p in self.files}
            self.by_real = {p.resolve(): p for p in self.files}
            self.started = True
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
        target._stop()
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
        try:
            for f in list(self.futures.values()):
                if f.exception() is not None:  # (waits for it)
                    from converter.errors import MxconvError

                    raise MxconvError(f"hashing the source failed: {f.exception()}")
        finally:
            self._stop()
        return dict(self.hashes)

    def _stop(self) -> None:
        """No more files: queued ones are dropped, and the threads leave once they have hashed
        those they hold."""
        with self.lock:
            self.stopping = True
            while self.pending:
                self.futures[self.pending.popleft()[0]].cancel()
            self.wake.notify_all()


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
    no file is hashed twice; otherwise hashes in threads of its own."""
    with _early_lock:
        early = _early.get(tuple(str(p.resolve()) for p in checkpoint_files))
    got: dict[str, str] = {}
    if early is not None and early.started:
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
