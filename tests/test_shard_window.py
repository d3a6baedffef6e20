"""Several output shards written at once (`pieces.interleave`, `execute.shard_window`), and the choice
between write(2) and a shared mapping on tmpfs: the order pieces are handed out in, how many
shard files are open at once during a real conversion, and that the bytes do not depend on it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import load_all, same_bytes

import converter
from converter.run import devices, execute, pieces, writer
from converter.run.pieces import Piece, interleave


def _shards(sizes: list[list[int]]) -> list[list[Piece]]:
    return [[Piece(i, None, (k, k + 1), b) for k, b in enumerate(row)] for i, row in enumerate(sizes)]


@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_interleave_hands_out_every_piece_once_from_at_most_window_shards(window):
    rng = random.Random(window)
    sizes = [[rng.randint(1, 100) for _ in range(rng.randint(0, 12))] for _ in range(9)]
    sizes[4] = []  # a shard with nothing to read is skipped, not counted as open
    order = list(interleave(_shards(sizes), window))
    assert sorted((p.shard, p.rows) for p in order) == [(i, (k, k + 1)) for i, r in enumerate(sizes)
                                                          for k in range(len(r))]
    for i in range(len(sizes)):  # a shard's own pieces keep their order
        assert [p.rows[0] for p in order if p.shard == i] == list(range(len(sizes[i])))
    first = {p.shard: n for n, p in reversed(list(enumerate(order)))}
    last = {p.shard: n for n, p in enumerate(order)}
    for n in range(len(order)):
        assert sum(first[i] <= n <= last[i] for i in first) <= window
    # shards open in plan order
    assert sorted(first, key=first.get) == sorted(first)


def test_interleave_balances_the_open_shards_by_bytes():
    """Each next piece goes to the open shard with the fewest bytes handed out, so two open shards
    never differ by more than one piece, and equal shards finish together."""
    order = list(interleave(_shards([[10] * 6, [30] * 2, [5] * 12]), 3))
    given = [0, 0, 0]
    for p in order:
        assert given[p.shard] == min(given[i] for i in range(3) if any(q.shard == i for q in order[order.index(p):]))
        given[p.shard] += p.input_bytes
    assert given == [60, 60, 60]
    assert list(interleave(_shards([[1, 1], [1, 1]]), 1)) == _shards([[1, 1], [1, 1]])[0] + _shards([[1, 1], [1, 1]])[1]


@pytest.mark.parametrize("window", [2, 3])
def test_a_shard_opening_later_does_not_starve_the_open_ones(window):
    """Shards open level with the least advanced open shard, so the writes keep alternating
    between `window` files from the first shard to the last (opened at 0 bytes, a new shard took
    every piece until it caught up: runs of 100 pieces from one file), and every shard's last
    piece comes out before a shard `window` places later is half handed out."""
    rng = random.Random(7)
    sizes = [[rng.randint(50, 100) for _ in range(rng.randint(95, 105))] for _ in range(10)]
    order = list(interleave(_shards(sizes), window))
    last = {p.shard: n for n, p in enumerate(order)}
    run, longest = 1, 1
    for n in range(1, len(order)):
        run = run + 1 if order[n].shard == order[n - 1].shard else 1
        still_open = sum(1 for i in range(10) if i != order[n].shard and last[i] > n and
                         any(p.shard == i for p in order[:n]))
        if still_open:
            longest = max(longest, run)
    assert longest <= 3
    for i in range(10 - window):
        later = [n for n, p in enumerate(order) if p.shard == i + window]
        assert last[i] < later[len(later) // 2]


def test_window_and_write_mode_follow_the_writer_count(monkeypatch):
    monkeypatch.delenv("MXCONV_MAPPED_WRITES", raising=False)
    monkeypatch.delenv("MXCONV_SHARD_WINDOW", raising=False)
    assert [execute.shard_window(40, w) for w in (1, 2, 4, 16)] == [2, 2, 2, 8]
    assert execute.shard_window(3, 16) == 3 and execute.shard_window(1, 16) == 1
    monkeypatch.setenv("MXCONV_SHARD_WINDOW", "4")  # the benchmarks' override, still at most the shards
    assert execute.shard_window(40, 16) == 4 and execute.shard_window(3, 1) == 3
    monkeypatch.delenv("MXCONV_SHARD_WINDOW")
    # write(2) when several shards are open; a mapping (None: where the file system is in memory)
    # only for one shard at a time written by at least 4 threads
    assert execute._mapping(2, 2) is False and execute._mapping(8, 16) is False
    assert execute._mapping(1, 16) is None and execute._mapping(1, 2) is False
    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "1")
    assert execute._mapping(8, 16) is None
    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "0")
    assert execute._mapping(1, 16) is False


def test_host_buffers_are_pinned_only_for_gpu_workers_alone(monkeypatch):
    """Beside CPU workers (the default with 8 cores or more) the pool stays pageable: most pieces
    never leave the host, and a pinned buffer would make its reader wait for the CUDA context."""
    import torch

    monkeypatch.delenv("MXCONV_PINNED", raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert devices.pinned([gpu, gpu]) is True
    assert devices.pinned([gpu, gpu, cpu]) is False and devices.pinned([cpu, cpu]) is False
    monkeypatch.setenv("MXCONV_PINNED", "1")
    assert devices.pinned([gpu, cpu]) is True
    monkeypatch.setenv("MXCONV_PINNED", "0")
    assert devices.pinned([gpu]) is False


@pytest.mark.parametrize("workers", [2, 4])
def test_a_conversion_writes_several_shards_at_once_with_the_same_bytes(tiny_sources, tmp_path, monkeypatch,
                                                                        workers):
    """Small pieces and small output shards: pieces go out `window` shards at a time, so several
    shard files are being written at once (more may be open: a shard whose pieces are all written
    is finished only after every shard before it), and the output equals a one-worker
    conversion's, file for file."""
    monkeypatch.setattr(pieces, "PIECE_BYTES", 2000)
    opened, peak, lock = set(), [0], threading.Lock()
    real_writer = execute.ShardWriter

    class Watched(real_writer):
        def __enter__(self):
            with lock:
                opened.add(self.path.name)
                peak[0] = max(peak[0], len(opened))
            return super().__enter__()

        def finish(self):
            super().finish()
            with lock:
                opened.discard(self.path.name)

    monkeypatch.setattr(execute, "ShardWriter", Watched)
    handed = []
    monkeypatch.setattr(execute, "interleave", lambda per_shard, window: (
        handed.append(window) or (handed.append(p.shard) or p for p in interleave(per_shard, window))))
    converter.convert(tiny_sources["fp8"], tmp_path / "many", quiet=True, workers=workers, max_shard_size="150KB",
                      processes=1)  # in this process, where the spies are
    shards = len(list((tmp_path / "many").glob("*.safetensors")))
    window, order = handed[0], handed[1:]
    assert shards >= 4 and window == execute.shard_window(shards, workers) == 2
    assert peak[0] >= 2 and order != sorted(order)  # interleaved, not shard after shard
    monkeypatch.setattr(execute, "ShardWriter", real_writer)
    converter.convert(tiny_sources["fp8"], tmp_path / "one", quiet=True, workers=1, max_shard_size="150KB")
    got, want = load_all(tmp_path / "many"), load_all(tmp_path / "one")
    assert sorted(got) == sorted(want) and all(same_bytes(got[n], want[n]) for n in want)
    for a in sorted((tmp_path / "one").glob("*.safetensors")):
        assert (tmp_path / "many" / a.name).read_bytes() == a.read_bytes()


def test_a_shard_is_written_by_one_thread_at_a_time_and_others_hand_their_outputs_over():
    """`writer.Turns`: the thread writing a shard also writes what others leave while it writes; they
    go on at once instead of waiting for the file's lock."""
    turns = writer.Turns()
    first = turns.mine("a")
    assert next(first) == "a"
    assert list(turns.mine("b")) == [] and list(turns.mine("c")) == []  # left to the writing thread
    assert list(first) == ["b", "c"]  # which writes them, in order, then lets go of the shard
    assert list(turns.mine("d")) == ["d"]


def test_a_writer_that_stops_taking_outputs_lets_go_of_the_shard():
    """Cancelled at a yield (the run failed): what was left for it is dropped with it, and the
    next thread to come writes its own output instead of leaving it to nobody."""
    turns = writer.Turns()
    first = turns.mine("a")
    assert next(first) == "a" and list(turns.mine("b")) == []
    first.close()
    assert list(turns.mine("c")) == ["c"]


def test_buffered_writes_to_one_shard_never_overlap(tiny_sources, tmp_path, monkeypatch):
    """write(2)s to one file take turns on its lock in the kernel, where a waiting writer spins:
    with buffered writes (no O_DIRECT, no mapping) each shard file is written by one thread at a
    time, while several shards are written at once, and the bytes are a one-worker conversion's."""
    monkeypatch.setattr(pieces, "PIECE_BYTES", 2000)
    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "0")
    monkeypatch.setattr(writer, "open_direct", lambda path, size: None)
    active: dict[str, int] = {}
    peak, lock = {"file": 0, "all": 0}, threading.Lock()
    real = writer.ShardWriter._pwrite

    def watched(self, data, offset):
        with lock:
            active[self.path.name] = active.get(self.path.name, 0) + 1
            peak["file"] = max(peak["file"], active[self.path.name])
            peak["all"] = max(peak["all"], sum(active.values()))
        try:
            time.sleep(0.003)  # long enough for the other writers to come to the same file
            real(self, data, offset)
        finally:
            with lock:
                active[self.path.name] -= 1

    monkeypatch.setattr(writer.ShardWriter, "_pwrite", watched)
    converter.convert(tiny_sources["fp8"], tmp_path / "many", quiet=True, workers=4, max_shard_size="150KB",
                      processes=1)  # in this process, where the spy is
    assert peak["file"] == 1 and peak["all"] >= 2  # one writer per file, several files at once
    monkeypatch.setattr(writer.ShardWriter, "_pwrite", real)
    converter.convert(tiny_sources["fp8"], tmp_path / "one", quiet=True, workers=1, max_shard_size="150KB")
    for a in sorted((tmp_path / "one").glob("*.safetensors")):
        assert (tmp_path / "many" / a.name).read_bytes() == a.read_bytes()


def test_piece_size_follows_the_benchmark_knob_and_the_pieces_in_flight_stay():
    """MXCONV_PIECE_MB (read once, at import) sets the source bytes per piece, 16 MB without it;
    the bytes in flight are counted in pieces of that size (2 per worker, 8 to 24 in all)."""
    env = {k: v for k, v in os.environ.items() if k != "MXCONV_PIECE_MB"}
    code = ("from converter.run import execute, pieces; "
            "print(pieces.PIECE_BYTES, execute._INFLIGHT_PER_WORKER, execute._MIN_INFLIGHT, execute._MAX_INFLIGHT)")

    def sizes(**extra: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                             cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True,
                             text=True).stdout
        return [int(x) for x in out.split()]

    mb = 1 << 20
    assert sizes() == [16 * mb, 32 * mb, 128 * mb, 384 * mb]
    assert sizes(MXCONV_PIECE_MB="4") == [4 * mb, 8 * mb, 32 * mb, 96 * mb]
    assert sizes(MXCONV_PIECE_MB="0.5") == [mb // 2, mb, 4 * mb, 12 * mb]
