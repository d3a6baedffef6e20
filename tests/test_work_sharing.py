"""How work is shared between devices: the CPU workers that `--device cuda` adds beside the GPU
workers (their bytes are the CPU path's: the CUDA tests compare them with and without helpers)."""

from __future__ import annotations

import os

from converter.run.devices import STREAMS_PER_GPU, cpu_helpers, resolve_devices
from converter.run.processes import deal


def test_cuda_adds_cpu_helpers_beside_the_gpu_workers(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("MXCONV_CPU_HELPERS", "3")
    devices = resolve_devices("cuda", None)
    assert [str(d) for d in devices] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cpu", "cpu", "cpu"]
    assert [str(d) for d in resolve_devices("cuda:1", 1)] == ["cuda:1", "cpu", "cpu", "cpu"]
    monkeypatch.setenv("MXCONV_CPU_HELPERS", "0")
    assert [str(d) for d in resolve_devices("cuda", 2)] == ["cuda:0", "cuda:1"]
    assert [str(d) for d in resolve_devices("cuda", 1)] == ["cuda:0", "cuda:1"]  # every GPU gets one
    monkeypatch.delenv("MXCONV_CPU_HELPERS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_helpers() == 14 and resolve_devices("cpu", None).count(torch.device("cpu")) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_helpers() == 0


def test_a_gpu_gets_at_most_the_workers_that_can_compute_on_it(monkeypatch):
    """More than STREAMS_PER_GPU workers on a GPU could only wait for its streams. They held pieces
    meanwhile, and counted as a process's workers when the processes were dealt: 16 GPU workers on
    one GPU left that process (a quarter of the shards) without CPU helpers. Now 16 are 2."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("MXCONV_CPU_HELPERS", raising=False)
    assert STREAMS_PER_GPU == 2
    many, default = resolve_devices("cuda", 16), resolve_devices("cuda", None)
    assert many == default and [str(d) for d in many] == ["cuda:0"] * 2 + ["cpu"] * 14
    assert [str(d) for d in resolve_devices("cuda:0", 16)] == ["cuda:0"] * 2 + ["cpu"] * 14
    parts = deal([str(d) for d in many], 4)
    assert [p.count("cuda:0") for p in parts] == [2, 0, 0, 0] and [len(p) for p in parts] == [5, 4, 4, 3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [str(d) for d in resolve_devices("cuda", 16) if d.type == "cuda"] == ["cuda:0", "cuda:1", "cuda:2"] * 2
    # verify's workers each check a shard of their own (no stream limit there): as many as asked
    assert sum(d.type == "cuda" for d in resolve_devices("cuda", 16, per_gpu=None)) == 16
