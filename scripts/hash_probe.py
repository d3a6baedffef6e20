#!/usr/bin/env python
"""How fast the source files' sha256 chains run side by side, by how each chain gets its bytes.

The source hash (`converter/sources/hashing.py`) runs one chain per file, in threads of the
converting process, reading the page cache through 16 MB mapped windows. A chain cannot be split,
so a file's hash takes at least its size over one chain's rate, whatever the workers. This probe
hashes every `*.safetensors` file in DIR at once, one chain a file, in each of these ways, and
prints the seconds, the GB/s of all chains together and of one chain:

    hasher               the source hasher (compiled rounds, 16 MB mapped windows), a thread a file
    hasher, hashlib      the same with MXCONV_SHA=hashlib (OpenSSL, 64 MB mapped windows)
    threads, mmap N      a thread a file: N-byte windows mapped, populated, hashed, unmapped
    threads, pread N     a thread a file: N bytes read into a buffer, hashed from there
    threads, ahead N     two threads a file: one maps and populates the next N-byte windows, the
                         other only hashes (the mapping's cost off the chain's path)
    processes, ...       the same in forked processes, one a file (no shared mmap lock)

Every way's digests must equal the hasher's (exit 1 otherwise). Put the files in the page cache
first (`cat DIR/*.safetensors > /dev/null`) to time the hashing, not the disk.

    python scripts/hash_probe.py DIR [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.libc import MADV_POPULATE_READ, libc, map_file  # noqa: E402
from converter.sources import sha256_pairs  # noqa: E402
from converter.sources.hashing import SourceHasher  # noqa: E402


def windows(m: sha256_pairs.Message, window: int):
    """(address, length) of each window of `m`'s whole blocks, `window` bytes at most, mapped and
    populated in one madvise; OSError where one cannot be mapped. The consumer unmaps them."""
    pos = 0
    while (whole := (m.size - pos) // 64 * 64):
        n = min(window, whole)
        address = map_file(m.fd, pos, n)
        if address is None:
            raise OSError(ctypes.get_errno(), f"cannot map {m.path}")
        libc().madvise(address, n, MADV_POPULATE_READ)
        yield address, n
        pos += n


def ahead(items, depth: int = 2):
    """`items` as a second thread makes them, up to `depth` ahead; its error is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def make() -> None:
        try:
            for item in items:
                ready.put(item)
            ready.put(None)
        except BaseException as e:  # the consumer must not wait for an item that never comes
            ready.put(e)

    maker = threading.Thread(target=make)
    maker.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        maker.join()


def hash_windows(m: sha256_pairs.Message, spans) -> str:
    """`m`'s digest from its mapped windows `spans` (each unmapped once hashed) and its tail."""
    compress = sha256_pairs.compressor()
    for address, n in spans:
        compress(m.state, address, None, None, n // 64)
        libc().munmap(address, n)
        m.pos += n
    return m.finish(compress)


def via_mmap(path: Path, window: int) -> str:
    """One file's digest through mapped windows of `window` bytes."""
    m = sha256_pairs.Message(path)
    return hash_windows(m, windows(m, window))


def via_mmap_ahead(path: Path, window: int) -> str:
    """The same with a second thread mapping and populating the windows up to two ahead, so that
    the chain's thread only runs the rounds."""
    m = sha256_pairs.Message(path)
    return hash_windows(m, ahead(windows(m, window)))


def via_pread(path: Path, chunk: int) -> str:
    """One file's digest through reads of `chunk` bytes into one buffer."""
    m, compress = sha256_pairs.Message(path), sha256_pairs.compressor()
    buf = bytearray(chunk)
    view, address = memoryview(buf), ctypes.addressof(ctypes.c_char.from_buffer(buf))
    while (whole := (m.size - m.pos) // 64 * 64):
        n = os.preadv(m.fd, [view[:min(chunk, whole)]], m.pos)
        compress(m.state, address, None, None, n // 64)
        m.pos += n // 64 * 64
    return m.finish(compress)


def in_threads(fn, files: list[Path], arg: int) -> dict[str, str]:
    out: dict[str, str] = {}
    threads = [threading.Thread(target=lambda f=f: out.__setitem__(f.name, fn(f, arg))) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _one(job: tuple) -> str:
    fn, path, arg = job
    return fn(path, arg)


def in_processes(fn, files: list[Path], arg: int) -> dict[str, str]:
    with multiprocessing.get_context("fork").Pool(len(files)) as pool:
        return dict(zip((f.name for f in files), pool.map(_one, [(fn, f, arg) for f in files])))


def hasher(files: list[Path], sha: str | None) -> dict[str, str]:
    if sha:
        os.environ["MXCONV_SHA"] = sha
    try:
        h = SourceHasher(files, threads=len(files), use_recorded=False)._launch()
        h.release_all()
        return h.result()
    finally:
        os.environ.pop("MXCONV_SHA", None)


WAYS = {
    "hasher": lambda fs: hasher(fs, None),
    "hasher, hashlib": lambda fs: hasher(fs, "hashlib"),
    "threads, mmap 16 MB": lambda fs: in_threads(via_mmap, fs, 16 << 20),
    "threads, mmap 256 MB": lambda fs: in_threads(via_mmap, fs, 256 << 20),
    "threads, ahead 4 MB": lambda fs: in_threads(via_mmap_ahead, fs, 4 << 20),
    "threads, ahead 16 MB": lambda fs: in_threads(via_mmap_ahead, fs, 16 << 20),
    "threads, pread 16 MB": lambda fs: in_threads(via_pread, fs, 16 << 20),
    "threads, pread 1 MB": lambda fs: in_threads(via_pread, fs, 1 << 20),
    "threads, pread 256 KB": lambda fs: in_threads(via_pread, fs, 256 << 10),
    "processes, mmap 16 MB": lambda fs: in_processes(via_mmap, fs, 16 << 20),
    "processes, pread 1 MB": lambda fs: in_processes(via_pread, fs, 1 << 20),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    files = sorted(args.dir.glob("*.safetensors"))
    if not files:
        sys.exit(f"hash_probe: no *.safetensors in {args.dir}")
    if sha256_pairs.compressor() is None:
        sys.exit("hash_probe: the compiled sha256 rounds are not available here (no compiler or no SHA-NI)")
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {total / 1e9:.2f} GB, one chain a file", flush=True)
    want = None
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            t = time.perf_counter()
            got = way(files)
            seconds = time.perf_counter() - t
            want = want or got
            if got != want:
                print(f"hash_probe: {name} gave other digests than the hasher", file=sys.stderr)
                return 1
            rate = total / seconds / 1e9
            print(f"{name:24s} {seconds:6.2f} s {rate:7.2f} GB/s {rate / len(files):6.2f} GB/s a chain", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
