"""Executing a plan: output shards run in a pool of workers; inside a worker the next job's
reads overlap the current job's compute and writes (torch and file I/O release the GIL)."""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from .errors import MxconvError
from .files import STATE_DIR
from .plan import COPY, Job, ShardPlan
from .recipe import Recipe
from .safetensors_io import ShardWriter
from .transform import run_job
from .view import CanonicalView

_HASH_CHUNK = 16 * 1024 * 1024


class Cancelled(Exception):
    """Another worker failed; this one stops at the next job boundary."""


def resolve_devices(device: str, workers: int) -> list[torch.device]:
    """One compute device per worker. `cuda` spreads workers over every visible GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MxconvError(f"--device {device} asked for, but no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is not None:
            if dev.index >= count:
                raise MxconvError(f"--device {device}: only {count} CUDA device(s) visible")
            return [dev] * workers
        return [torch.device("cuda", i % count) for i in range(workers)]
    if dev.type != "cpu":
        raise MxconvError(f"unsupported --device {device!r}; use cpu, cuda or cuda:N")
    return [dev] * workers


class SourceHasher:
    """sha256 of every source file, computed in a background thread during the conversion."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.hashes: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mxconv-hash", daemon=True)

    def _run(self) -> None:
        try:
            buf = bytearray(_HASH_CHUNK)
            view = memoryview(buf)
            for path in self.files:
                h = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        h.update(view[:n])
                self.hashes[path.name] = h.hexdigest()
        except BaseException as e:  # reported by result()
            self.error = e

    def start(self) -> "SourceHasher":
        self.thread.start()
        return self

    def result(self) -> dict[str, str]:
        self.thread.join()
        if self.error is not None:
            raise MxconvError(f"hashing the source failed: {self.error}")
        return self.hashes


def _load_inputs(view: CanonicalView, job: Job, device: torch.device) -> dict[str, torch.Tensor]:
    # Copies never need the accelerator: their bytes go straight back to disk.
    where = torch.device("cpu") if job.action == COPY else device
    return {name: view.load(name, where) for name in job.inputs}


def run_shard(shard: ShardPlan, view: CanonicalView, dst: Path, recipe: Recipe, device: torch.device,
              progress: Callable[[int], None], cancel: threading.Event) -> None:
    tmp = dst / STATE_DIR / f"{shard.name}.partial"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with ShardWriter(dst / shard.name, tmp, shard.tensors) as writer, ThreadPoolExecutor(1) as reader:
        pending = reader.submit(_load_inputs, view, shard.jobs[0], device)
        for i, job in enumerate(shard.jobs):
            if cancel.is_set():
                raise Cancelled()
            inputs = pending.result()
            if i + 1 < len(shard.jobs):
                pending = reader.submit(_load_inputs, view, shard.jobs[i + 1], device)
            try:
                outputs = run_job(job, inputs.__getitem__, recipe)
            except MxconvError as e:  # numerics name the tensor; add the file it came from
                raise e.in_file((view.tensors.get(e.tensor) or view.tensors[job.inputs[0]]).file)
            for name, tensor in outputs.items():
                writer.write(name, tensor)
            del inputs
            progress(job.input_bytes)


def execute(shards: list[ShardPlan], view: CanonicalView, dst: Path, recipe: Recipe, devices: list[torch.device],
            progress: Callable[[int], None]) -> None:
    """Run every shard; the first error cancels the rest and is raised as is."""
    if not shards:
        return
    cancel = threading.Event()
    workers = min(len(devices), len(shards))
    if workers == 1:  # inline: easy to debug, same code path
        for shard in shards:
            run_shard(shard, view, dst, recipe, devices[0], progress, cancel)
        return
    free_devices: queue.SimpleQueue = queue.SimpleQueue()
    for dev in devices[:workers]:
        free_devices.put(dev)

    def task(shard: ShardPlan) -> None:
        dev = free_devices.get()  # each running shard holds one device slot
        try:
            run_shard(shard, view, dst, recipe, dev, progress, cancel)
        finally:
            free_devices.put(dev)

    with ThreadPoolExecutor(workers, thread_name_prefix="mxconv-shard") as pool:
        futures = [pool.submit(task, s) for s in shards]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None and not isinstance(f.exception(), Cancelled)]
        if failed:
            cancel.set()
            for f in futures:
                f.cancel()
            raise failed[0].exception()
        for f in futures:
            f.result()
