#!/usr/bin/env python
"""How fast a file system in memory takes writes, by files written at once and threads per file:
threads `pwrite` 16 MB blocks (GIL released) until 12 GB (PROBE_GB) are written, then the files
go. On tmpfs one file takes one write at a time (its lock is held for the copy), so the rate
grows with files, not with threads per file. docs/performance-log.md "seventh session" has its
numbers from the 16-core H200 VM, where 8 files at once took 16-18 GB/s: more than a conversion
writes.

    python scripts/tmpfs_probe.py [FOLDER]   (default /dev/shm/mxconv-probe, removed afterwards)
"""

import os
import sys
import threading
import time

BLOCK = 16 << 20
CASES = [(1, 1, False), (1, 2, True), (1, 16, True), (8, 1, False), (8, 2, True), (8, 2, False),
         (16, 1, False), (16, 1, True), (32, 1, False)]  # (files, threads per file, sized first)


def run(root: str, total: int, files: int, per_file: int, sized: bool, data: bytearray) -> float:
    size = total // files // per_file // BLOCK * BLOCK * per_file
    paths = [os.path.join(root, f"f{i}") for i in range(files)]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) for p in paths]
    try:
        if sized:
            for fd in fds:
                os.ftruncate(fd, size)
        part = size // per_file

        def work(fd: int, lo: int) -> None:
            for off in range(lo, lo + part, BLOCK):
                os.pwrite(fd, data, off)

        threads = [threading.Thread(target=work, args=(fd, k * part)) for fd in fds for k in range(per_file)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return size * files / (time.perf_counter() - t0)
    finally:
        for fd, p in zip(fds, paths):
            os.close(fd)
            os.unlink(p)


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "/dev/shm/mxconv-probe"
    total = int(float(os.environ.get("PROBE_GB", "12")) * (1 << 30))
    os.makedirs(root, exist_ok=True)
    data = bytearray(os.urandom(1 << 20)) * (BLOCK >> 20)
    try:
        for files, per_file, sized in CASES:
            rate = run(root, total, files, per_file, sized, data)
            print(f"files {files:2d}, threads per file {per_file:2d}, sized first {'yes' if sized else 'no ':3s}: "
                  f"{rate / 1e9:6.2f} GB/s", flush=True)
    finally:
        os.rmdir(root)


if __name__ == "__main__":
    main()
