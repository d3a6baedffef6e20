"""How work is shared: several output shards written at once (pieces handed out round-robin over
a window of open shards: the order is right, and the bytes are those of one shard at a time), and
the CPU workers that `--device cuda` adds beside the GPU workers."""

from __future__ import annotations

import json

import pytest
from helpers import load_all, same_bytes

import converter
from converter.files import INDEX_FILE
from converter.run import execute, pieces


def test_interleave_takes_shards_round_robin_in_plan_order():
    shards = [["a0", "a1", "a2"], ["b0"], ["c0", "c1"], ["d0"]]
    assert list(execute.interleave(shards, 1)) == ["a0", "a1", "a2", "b0", "c0", "c1", "d0"]
    assert list(execute.interleave(shards, 2)) == ["a0", "b0", "a1", "c0", "a2", "c1", "d0"]
    assert list(execute.interleave(shards, 8)) == ["a0", "b0", "c0", "d0", "a1", "c1", "a2"]
    assert list(execute.interleave([[], ["x"], []], 2)) == ["x"]


def test_window_from_the_io_threads_and_the_environment(monkeypatch):
    monkeypatch.delenv("MXCONV_SHARD_WINDOW", raising=False)
    assert [execute.shard_window(n) for n in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]
    monkeypatch.setenv("MXCONV_SHARD_WINDOW", "3")
    assert execute.shard_window(2) == 3


@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_many_open_shards_give_the_bytes_of_one_at_a_time(tiny_sources, tmp_path, monkeypatch, source):
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4000)  # many pieces per shard, so shards interleave
    order = []
    real = execute.interleave
    monkeypatch.setattr(execute, "interleave", lambda per, w: (order.append(p.shard) or p for p in real(per, w)))
    monkeypatch.setenv("MXCONV_SHARD_WINDOW", "1")
    converter.convert(tiny_sources[source], tmp_path / "one", quiet=True, workers=3, max_shard_size="200KB")
    assert order == sorted(order)
    order.clear()
    monkeypatch.setenv("MXCONV_SHARD_WINDOW", "4")
    converter.convert(tiny_sources[source], tmp_path / "four", quiet=True, workers=3, max_shard_size="200KB")
    assert order != sorted(order) and len(set(order)) > 4  # really interleaved, over many shards
    one, four = load_all(tmp_path / "one"), load_all(tmp_path / "four")
    assert sorted(one) == sorted(four) and all(same_bytes(one[n], four[n]) for n in one)
    index = json.loads((tmp_path / "four" / INDEX_FILE).read_text())
    assert index == json.loads((tmp_path / "one" / INDEX_FILE).read_text())


def test_cuda_adds_cpu_helpers_beside_the_gpu_workers(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("MXCONV_CPU_HELPERS", "3")
    devices = execute.resolve_devices("cuda", None)
    assert [str(d) for d in devices] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cpu", "cpu", "cpu"]
    assert [str(d) for d in execute.resolve_devices("cuda:1", 1)] == ["cuda:1", "cpu", "cpu", "cpu"]
    monkeypatch.setenv("MXCONV_CPU_HELPERS", "0")
    assert [str(d) for d in execute.resolve_devices("cuda", 2)] == ["cuda:0", "cuda:1"]
    monkeypatch.delenv("MXCONV_CPU_HELPERS")
    monkeypatch.setattr(execute.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert execute.cpu_helpers() == 14 and execute.resolve_devices("cpu", None).count(torch.device("cpu")) == 16
    monkeypatch.setattr(execute.os, "sched_getaffinity", lambda pid: {0, 1})
    assert execute.cpu_helpers() == 0
