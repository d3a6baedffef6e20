"""How work is shared between devices: the CPU workers that `--device cuda` adds beside the GPU
workers (their bytes are the CPU path's: the CUDA tests compare them with and without helpers)."""

from __future__ import annotations

import os

from converter.run.devices import cpu_helpers, resolve_devices


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
    monkeypatch.delenv("MXCONV_CPU_HELPERS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_helpers() == 14 and resolve_devices("cpu", None).count(torch.device("cpu")) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_helpers() == 0
