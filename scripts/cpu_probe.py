#!/usr/bin/env python
"""What P cores can do at once, without mxconv's pipeline around it: how the BF16 -> MXFP8 kernel
and sha256 (the two things a conversion spends its CPU on) scale with the number of processes
working at once, from a buffer in the core's cache (compute alone) and from memory (compute and
memory traffic). If 16 processes do no more than about 8 do from cache, the 16 "cores" are 8
cores with two hardware threads each; if they do from cache but not from memory, memory
bandwidth is what runs out. It prints the CPU topology the kernel reports first.

    mode      each process
    bf16-l2   quantizes the same 64 x 7168 BF16 rows (0.9 MB) over and over
    bf16-mem  quantizes its own 1 GB of BF16, 64 rows at a time, into one cached output band
    sha-l2    sha256 (one chain, the compiled SHA-NI rounds) over the same 0.9 MB over and over
    sha-mem   sha256 over its own 1 GB
    ossl-l2   sha256 with hashlib (OpenSSL) over the same 0.9 MB over and over: the one-chain rate
              the compiled rounds are to match

    python scripts/cpu_probe.py [PROCS]   (default 1,2,4,8,12,16)
"""

import ctypes
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from converter.numerics import native
from converter.numerics.kernels import scale_tables
from converter.sources.sha256_pairs import H0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from band_probe import timed  # noqa: E402

K, BAND = 7168, 64
BIG = (1 << 30) // (2 * K) // BAND * BAND  # rows of 1 GB of BF16
WORK = 1 << 31  # bytes of input each process gets through, at least (whole steps: `work`)


def topology() -> None:
    cpus = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*"), key=lambda p: int(p.name[3:]))
    siblings = {(p / "topology/thread_siblings_list").read_text().strip() for p in cpus
                if (p / "topology/thread_siblings_list").exists()}
    cores = {((p / "topology/physical_package_id").read_text().strip(), (p / "topology/core_id").read_text().strip())
             for p in cpus if (p / "topology/core_id").exists()}
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{model}; {len(cpus)} CPUs, {len(cores)} (package, core) ids, sibling sets: {sorted(siblings)}")
    for cache in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        print(f"  L{(cache / 'level').read_text().strip()} {(cache / 'type').read_text().strip()}: "
              f"{(cache / 'size').read_text().strip()}, shared by CPUs {(cache / 'shared_cpu_list').read_text().strip()}")


def work(mode: str) -> int:
    """The bytes a process of `mode` hashes or quantizes: WORK rounded up to whole steps (a step
    being the 0.9 MB band or the whole 1 GB buffer that one call goes through)."""
    step = BAND * K * 2 if mode.endswith("l2") else BIG * K * 2  # the L2 modes' buffer: 0.9 MB
    return -(-WORK // step) * step


def child(lib, tables, mode: str, index: int, ready: int, go: int, report: int) -> None:
    torch.set_num_threads(1)
    rows = BIG if mode.endswith("mem") else BAND
    x = torch.empty((rows, K), dtype=torch.bfloat16)
    tile = torch.randn((BAND, K), generator=torch.Generator().manual_seed(index)).to(torch.bfloat16)
    x.view(-1, BAND, K).copy_(tile)  # every page touched before the clock starts
    q, sc = torch.empty((BAND, K), dtype=torch.uint8), torch.empty((BAND, K // 32), dtype=torch.uint8)
    state = (ctypes.c_uint32 * 8)(*H0)
    band_bytes, whole = BAND * K * 2, rows * K * 2
    os.write(ready, b"r")
    os.read(go, 1)
    t0 = time.perf_counter()
    done = 0
    h, l2 = hashlib.sha256(), memoryview(x.view(torch.uint8).numpy())
    while done < work(mode):
        if mode == "ossl-l2":
            h.update(l2)
            done += l2.nbytes
            continue
        if mode.startswith("sha"):
            chunk = whole
            assert lib.mx_sha256_blocks(state, x.data_ptr(), None, None, chunk // 64) == 0
            done += chunk
            continue
        for r in range(0, rows, BAND):
            assert lib.mx_quantize_bf16(x[r].data_ptr(), BAND, K, tables[0].data_ptr(), tables[1].data_ptr(), 0,
                                        q.data_ptr(), sc.data_ptr()) == 0
        done += whole if mode == "bf16-mem" else band_bytes
    os.write(report, f"{time.perf_counter() - t0}\n".encode())


def main() -> None:
    counts = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,12,16").split(",")]
    topology()
    lib, tables = native.load(), scale_tables("rceil", torch.device("cpu"))
    if lib is None:
        sys.exit("cpu_probe: the compiled kernels did not build here")
    for mode in ("bf16-l2", "bf16-mem", "sha-l2", "sha-mem", "ossl-l2"):
        base = None
        for procs in counts:
            wall, slowest = timed(procs, lambda i, *rest: child(lib, tables, mode, i, *rest))
            rate = work(mode) * procs / slowest / 1e9  # the slowest one's own seconds: not its exit
            base = base or rate / procs
            print(f"{mode:8s} {procs:2d} processes: {rate:6.2f} GB/s of input, {rate / base:5.2f}x one "
                  f"(slowest {slowest:.2f} s, all done and exited {wall:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
