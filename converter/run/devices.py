"""Which workers a run gets, and what the host does beside them: one compute device per worker
(`resolve_devices`, with `cpu_helpers` beside GPU workers), the reader and writer threads
(`io_threads`), torch's own thread pool (`intra_op_threads`), and whether host buffers are pinned
(`pinned`). Policy only; `execute` runs the pipeline with it."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from converter.errors import MxconvError

# GPU workers per GPU. More made a conversion slower (FP8, 16-core H200: 3.6 s with 2 workers,
# 7.1 s with 16): their streams only contend (for the GIL between kernel launches, the copy
# engines, pinned memory), while one piece's numerics take about a millisecond on the GPU. Made to
# wait for two streams instead, they still held pieces the CPU helpers could have converted, and
# counted as a whole process's workers when the conversion processes are dealt
# (`processes.deal`): 16 GPU workers would leave their GPU's process, with its share of the
# shards, without CPU helpers. So a conversion gives a GPU no more workers than this, and every
# conversion's device list comes from `resolve_devices` (verify's workers each check a shard of
# their own and may ask for more: `per_gpu`).
STREAMS_PER_GPU = 2


def cores() -> int:
    """Cores this process may use: its CPU affinity, or the share MXCONV_CORE_SHARE gives one of
    several conversion processes (`processes.py`), for its reader, writer and torch threads."""
    share = os.environ.get("MXCONV_CORE_SHARE")
    return max(1, int(share)) if share else len(os.sched_getaffinity(0))


def cpu_helpers() -> int:
    """CPU workers beside the GPU workers of `--device cuda`: the cores but two (which launch the
    GPU work), where there are at least 8; MXCONV_CPU_HELPERS sets the count (0: GPUs only).
    On a 16-core H200 machine the compiled CPU kernels converted an FP8 source faster than the GPU
    path (copies in and out for a millisecond of numerics per piece), so the GPUs add to the cores
    instead of replacing them; the bytes are the same whoever computes a piece."""
    env = os.environ.get("MXCONV_CPU_HELPERS")
    if env:
        return max(0, int(env))
    cores = len(os.sched_getaffinity(0))
    return cores - 2 if cores >= 8 else 0


def resolve_devices(device: str, workers: int | None, per_gpu: int | None = STREAMS_PER_GPU
                    ) -> list[torch.device]:
    """One compute device per worker. `cuda` uses every visible GPU (at least one worker each, at
    most `per_gpu`, None: no limit), plus `cpu_helpers()` CPU workers. workers None: one per CPU
    core, or two per GPU (one computes while the other's copies run)."""
    dev = torch.device(device)
    if workers is None:
        gpus = torch.cuda.device_count() if dev.type == "cuda" and dev.index is None else 1
        workers = 2 * gpus if dev.type == "cuda" else max(1, len(os.sched_getaffinity(0)))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MxconvError(f"--device {device} asked for, but no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is not None:
            if dev.index >= count:
                raise MxconvError(f"--device {device}: only {count} CUDA device(s) visible")
            gpu = [dev] * (workers if per_gpu is None else min(workers, per_gpu))
        else:
            n = max(workers, count) if per_gpu is None else min(max(workers, count), per_gpu * count)
            gpu = [torch.device("cuda", i % count) for i in range(n)]
        return gpu + [torch.device("cpu")] * cpu_helpers()
    if dev.type != "cpu":
        raise MxconvError(f"unsupported --device {device!r}; use cpu, cuda or cuda:N")
    return [dev] * workers


@contextmanager
def intra_op_threads(devices: list[torch.device]):
    """Workers parallelize over jobs; torch's own thread pool on top of that would oversubscribe
    the cores (N workers x N OpenMP threads busy-waiting), so it gets the cores left over."""
    before = torch.get_num_threads()
    # the reader and writer threads count too: a copy into a mapped shard is a torch op, and 16
    # writer threads each fanning out to 16 OpenMP threads would bury the cores
    busy = max(sum(d.type == "cpu" for d in devices), io_threads(devices))
    torch.set_num_threads(max(1, cores() // busy // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def io_threads(devices: list[torch.device]) -> int:
    """Reader threads, and as many writer threads: one per CPU worker (a worker count is a core
    count there); with accelerators, one per core as well, since the CPU's only work then is
    moving bytes, and a few GPU workers keep the GPU busy."""
    if all(d.type == "cpu" for d in devices):
        return len(devices)
    return max(len(devices), cores())


def pinned(devices: list[torch.device]) -> bool:
    """Whether the pooled host buffers are pinned (page-locked): only where every worker is a GPU
    worker, since there the copies are all there is to the host's part. Beside CPU workers (the
    default with 8 cores or more: `cpu_helpers`), most pieces never leave the host, every pinned
    allocation costs a cudaHostAlloc inside the run, and the first one makes each reader thread
    wait for the CUDA context; a GPU worker copies from pageable memory instead (synchronously,
    which it waits for anyway). MXCONV_PINNED=1/0 forces it either way (read here only)."""
    env = os.environ.get("MXCONV_PINNED")
    if env is not None:
        return env != "0"
    return bool(devices) and all(d.type == "cuda" for d in devices)
