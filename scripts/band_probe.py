#!/usr/bin/env python
"""Whether FP8 -> MXFP8 on many cores is bound by memory traffic: P processes (forked), each
converting 1 GB of FP8 codes (K = 7168, 128x128 float32 tile scales) with the compiled kernel and
writing the result to its own tmpfs file with pwrite(2), in one of these ways:

    copy     pwrite the source as is (a copy's write half)
    compute  convert only, into a 16.5 MB buffer
    piece    convert a 16.5 MB piece into a buffer, then pwrite it (what the pipeline did)
    band     convert BAND rows at a time into a buffer that stays in the core's cache, pwrite each

On the 16-core H100 VM (docs/performance-log.md, "ninth session"), 16 processes: copy 8.2 GB/s
of input, compute 16.9, piece 10.4, band of 128 rows 12.3; with 8 processes piece and band were
the same (6.8-7.4): the output buffer's trip through memory costs only where memory is the limit. (Those numbers
came from a first draft of this script with the same loops and output format of its own.)

    python scripts/band_probe.py [FOLDER [PROCS]]   (default /dev/shm/mxconv-band-probe, 1,8,16)
"""

import os
import sys
import time

import torch

from converter.numerics import native
from converter.numerics.kernels import scale_tables

K = 7168
ROWS = (1 << 30) // K // 128 * 128
PIECE = 2304  # rows: 16.5 MB
MODES = [("copy", 0), ("compute", 0), ("piece", 0), ("band", 128), ("band", 256)]


def child(lib, tables, root: str, mode: str, index: int, band: int, ready: int, go: int, report: int) -> None:
    g = torch.Generator().manual_seed(index)
    w = torch.randint(0, 126, (ROWS, K), dtype=torch.uint8, generator=g)  # finite e4m3 codes
    s = torch.rand((ROWS // 128, K // 128), generator=g) * 1e-2 + 1e-3
    q, sc = torch.empty((PIECE, K), dtype=torch.uint8), torch.empty((PIECE, K // 32), dtype=torch.uint8)
    fd = os.open(f"{root}/f{index}", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(ready, b"r")
    os.read(go, 1)
    t0 = time.perf_counter()
    qoff, soff = 0, ROWS * K
    for r0 in range(0, ROWS - PIECE + 1, PIECE):
        if mode == "copy":
            os.pwrite(fd, memoryview(w[r0:r0 + PIECE].numpy()).cast("B"), qoff)
            qoff += PIECE * K
            continue
        step = band if mode == "band" else PIECE
        for b0 in range(0, PIECE, step):
            r = r0 + b0
            assert lib.mx_requantize_fp8(w[r].data_ptr(), step, K, s[r // 128].data_ptr(), K // 128,
                                         tables[0].data_ptr(), tables[1].data_ptr(), 0, q.data_ptr(),
                                         sc.data_ptr()) == 0
            if mode != "compute":
                os.pwrite(fd, memoryview(q[:step].numpy()).cast("B"), qoff)
                os.pwrite(fd, memoryview(sc[:step].numpy()).cast("B"), soff)
            qoff, soff = qoff + step * K, soff + step * K // 32
    os.write(report, f"{time.perf_counter() - t0}\n".encode())
    os.close(fd)


def timed(procs: int, target, *args) -> tuple[float, float]:
    """Fork `procs` children running target(index, *args, ready, go, report): each readies itself
    (writes to `ready`), waits for `go`, works, and reports its own seconds. (wall, slowest)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    for i in range(procs):
        pid = os.fork()
        if pid == 0:
            try:
                target(i, *args, ready_w, go_r, report_w)
            finally:
                os._exit(0)
        pids.append(pid)
    for _ in range(procs):
        os.read(ready_r, 1)
    t0 = time.perf_counter()
    os.write(go_w, b"g" * procs)
    for pid in pids:
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    slowest = max(map(float, os.read(report_r, 65536).decode().split()))
    for fd in (ready_r, ready_w, go_r, go_w, report_r, report_w):
        os.close(fd)
    return wall, slowest


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "/dev/shm/mxconv-band-probe"
    counts = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "1,8,16").split(",")]
    lib, tables = native.load(), scale_tables("rceil", torch.device("cpu"))
    os.makedirs(root, exist_ok=True)
    try:
        for procs in counts:
            for mode, band in MODES:
                wall, slowest = timed(procs, lambda i, *rest: child(lib, tables, root, mode, i, band, *rest))
                done = ROWS // PIECE * PIECE * K * procs
                print(f"{procs:2d} processes, {mode:7s} {band or '':>4}: {done / wall / 1e9:6.2f} GB/s of input "
                      f"(slowest {slowest:.2f} s)", flush=True)
                for name in os.listdir(root):
                    os.unlink(os.path.join(root, name))
    finally:
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))
        os.rmdir(root)


if __name__ == "__main__":
    main()
