"""The source hasher's two files at once (`sources/sha256_pairs.py`, `numerics/sha256.c`): every
digest equal to hashlib's, for lengths around every padding case and across mapped windows;
pairs only where more files wait than threads are free; hashlib wherever the compiled rounds or
a mapping are missing."""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import threading
import time

import pytest

from converter.sources import hashing, sha256_pairs

_COMPRESS = sha256_pairs.compressor()
needs_compiled = pytest.mark.skipif(_COMPRESS is None, reason="no compiled sha256 rounds here (no C compiler, "
                                    "MXCONV_NATIVE=0, or a CPU without the SHA extensions)")
# around the padding's edges (55/56: the length still fits the last block), block and window edges
_LENGTHS = [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 4095, 4096, 4097, 65536, 65536 * 3 + 77, 200_001]


def _files(tmp_path, lengths):
    out = []
    for i, n in enumerate(lengths):
        (p := tmp_path / f"model-{i:05d}.safetensors").write_bytes(os.urandom(n))
        out.append(p)
    return out


def _digests(files):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@needs_compiled
def test_the_compiled_rounds_one_and_two_messages_at_once():
    """mx_sha256_blocks over padded messages, alone and two by two (of different contents, the
    same block count): hashlib's digests."""
    def padded(data: bytes) -> bytes:
        return data + b"\x80" + bytes((55 - len(data)) % 64) + struct.pack(">Q", len(data) * 8)

    def state():
        return (ctypes.c_uint32 * 8)(*sha256_pairs.H0)

    for n in _LENGTHS[:12]:
        a, b = os.urandom(n), os.urandom(n)
        pa, pb = padded(a), padded(b)
        sa, sb, alone = state(), state(), state()
        assert _COMPRESS(sa, pa, sb, pb, len(pa) // 64) == 0
        assert _COMPRESS(alone, pa, None, None, len(pa) // 64) == 0
        assert struct.pack(">8I", *sa).hex() == struct.pack(">8I", *alone).hex() == hashlib.sha256(a).hexdigest()
        assert struct.pack(">8I", *sb).hex() == hashlib.sha256(b).hexdigest()


@needs_compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_files_hashed_two_at_a_time_give_hashlibs_digests(tmp_path, monkeypatch, threads):
    """Fewer threads than files: the threads take files two at a time (seen in the steps they
    run), over windows of 64 KB, files of every length pairing with every other as they end."""
    monkeypatch.setattr(sha256_pairs, "WINDOW", 1 << 16)
    steps = []
    real = sha256_pairs.step
    monkeypatch.setattr(sha256_pairs, "step", lambda messages, c: steps.append(len(messages)) or real(messages, c))
    files = _files(tmp_path, _LENGTHS)
    got = hashing.SourceHasher(files, threads=threads, use_recorded=False).start()
    got.release_all()
    assert got.result() == _digests(files)
    assert 2 in steps


@needs_compiled
def test_no_pairs_while_a_thread_is_free(tmp_path, monkeypatch):
    """As many threads as files: each takes one (paired, a file would take longer to finish)."""
    steps = []
    real = sha256_pairs.step
    monkeypatch.setattr(sha256_pairs, "step", lambda messages, c: steps.append(len(messages)) or real(messages, c))
    files = _files(tmp_path, [300_000] * 4)
    h = hashing.SourceHasher(files, threads=4, use_recorded=False).start()
    h.release_all()
    assert h.result() == _digests(files)
    assert steps and set(steps) == {1}


def test_hash_threads_half_the_cores_at_most_one_a_file_or_as_told(tmp_path, monkeypatch):
    files = _files(tmp_path, [10] * 5)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("MXCONV_HASH_THREADS", raising=False)
    assert hashing.SourceHasher(files, use_recorded=False).threads == 5
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert hashing.SourceHasher(files, use_recorded=False).threads == 3
    monkeypatch.setenv("MXCONV_HASH_THREADS", "2")
    assert hashing.SourceHasher(files, use_recorded=False).threads == 2
    monkeypatch.setenv("MXCONV_HASH_THREADS", "9")
    assert hashing.SourceHasher(files, use_recorded=False).threads == 5
    assert hashing.SourceHasher(files, threads=7, use_recorded=False).threads == 7


@pytest.mark.parametrize("compiled", [True, False])
def test_a_file_that_cannot_be_mapped_is_read(tmp_path, monkeypatch, compiled):
    """Where no window maps (some special file systems), neither for the compiled rounds nor for
    hashlib, the files are read instead: the same digests."""
    def refuse(*args, **kwargs):
        raise OSError("mmap refused")

    tried = []  # the compiled path's mappings asked for (each refused)
    if not compiled:
        monkeypatch.setattr(sha256_pairs, "compressor", lambda: None)
    monkeypatch.setattr(sha256_pairs, "map_file", lambda *a, **k: tried.append(a) and None)
    monkeypatch.setattr(hashing.mmap, "mmap", refuse)
    files = _files(tmp_path, [0, 70_000, 5, 130_000])
    h = hashing.SourceHasher(files, threads=1, use_recorded=False).start()
    h.release_all()
    assert h.result() == _digests(files)
    assert bool(tried) == (compiled and _COMPRESS is not None)


def test_a_file_gone_before_its_turn_is_the_hashers_error(tmp_path, monkeypatch):
    """A file removed before its turn: result() names the failure (no hang, no digest)."""
    monkeypatch.setattr(hashing, "cached", lambda path: False)  # nothing hashed ahead of release_all
    files = _files(tmp_path, [1000, 2000, 3000])
    h = hashing.SourceHasher(files, threads=1, use_recorded=False)._launch()
    files[1].unlink()
    h.release_all()
    with pytest.raises(Exception, match="hashing the source failed"):
        h.result()


def _result_within(h, seconds=20):
    """h.result() run in a thread: ("ok", digests), ("error", exception), or ("hang", None)."""
    out = []

    def run():
        try:
            out.append(("ok", h.result()))
        except Exception as e:
            out.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else ("hang", None)


@pytest.mark.parametrize("where", ["begin", "message"])
def test_a_thread_that_fails_fails_its_files_instead_of_hanging(tmp_path, monkeypatch, where):
    """A bug in a hashing thread (here an injected error where it takes a file): result() says so
    at once, for the file taken and for those still queued, instead of waiting forever."""
    monkeypatch.setattr(hashing, "cached", lambda path: False)
    files = _files(tmp_path, [100_000] * 4)
    if where == "begin":
        real = hashing.SourceHasher._begin
        monkeypatch.setattr(hashing.SourceHasher, "_begin", lambda self, path, ahead: (
            _raise(RuntimeError("injected")) if path == files[0] else real(self, path, ahead)))
    else:
        real_init = sha256_pairs.Message.__init__
        monkeypatch.setattr(sha256_pairs.Message, "__init__", lambda self, path: (
            _raise(MemoryError("injected")) if path == files[0] else real_init(self, path)))
        monkeypatch.setattr(sha256_pairs, "compressor", lambda: _COMPRESS or (lambda *a: 0))
    h = hashing.SourceHasher(files, threads=1, use_recorded=False)._launch()
    h.release_all()
    outcome, error = _result_within(h)
    assert outcome == "error" and "injected" in str(error)


def _raise(e):
    raise e


def test_a_burst_of_files_starts_threads_beside_a_waiting_one(tmp_path, monkeypatch):
    """Files queued while a thread waits (notified, not yet running): more threads start, up to
    the limit, rather than leaving every file to the one thread."""
    monkeypatch.setattr(hashing, "cached", lambda path: False)  # the files come as released below
    files = _files(tmp_path, [200_000] * 20)
    h = hashing.SourceHasher(files, threads=4, use_recorded=False)._launch()
    h.release(files[0])
    h.futures[files[0]].result(timeout=20)
    deadline = time.monotonic() + 20
    while h.idle != 1 and time.monotonic() < deadline:  # the thread waits for more
        time.sleep(0.01)
    assert h.running == 1 and h.idle == 1
    # Until the burst is queued, neither the waiting thread nor a new one runs: its wake-ups are
    # held back (and delivered after), and new threads wait at a gate. (Without the gate a new
    # thread could hash the queue empty mid-burst and wait, and the burst's later files rightly
    # start no thread: the count below would depend on the scheduler.)
    wake, held_back = h.wake.notify, []
    h.wake.notify = lambda n=1: held_back.append(n)
    gate, work = threading.Event(), h._work
    h._work = lambda: gate.wait(20) and work()
    for p in files[1:]:
        h.release(p)
    assert h.running == 4
    h.wake.notify = wake
    with h.lock:
        for n in held_back:
            wake(n)
    gate.set()
    assert _result_within(h) == ("ok", _digests(files))


@needs_compiled
def test_a_file_cut_short_before_its_last_block_is_an_error(tmp_path):
    """A file that shrinks after its whole blocks were hashed: finish() says so instead of padding
    a shorter tail into a digest of neither content."""
    (p := tmp_path / "f").write_bytes(os.urandom(100))
    m = sha256_pairs.Message(p)
    assert sha256_pairs.step([m], _COMPRESS) == []
    assert m.pos == 64 and sha256_pairs.step([m], _COMPRESS) == [m]
    os.truncate(p, 70)
    with pytest.raises(OSError, match="cut short"):
        m.finish(_COMPRESS)
    assert m.fd == -1


@needs_compiled
def test_the_hasher_hashes_a_file_cut_short_at_its_end_again(tmp_path, monkeypatch):
    """The hasher's side of the above: a file cut inside its last block once its whole blocks
    were hashed gets hashlib's digest of what is there now (the run then sees the change), not
    a digest padded from the shorter tail."""
    files = _files(tmp_path, [1000, 3000])
    real = sha256_pairs.Message.finish

    def cut_then_finish(self, compress):
        if self.path == files[0] and os.path.getsize(self.path) == 1000:
            os.truncate(self.path, 970)  # whole blocks end at 960: the 40-byte tail is now 10
        return real(self, compress)

    monkeypatch.setattr(sha256_pairs.Message, "finish", cut_then_finish)
    h = hashing.SourceHasher(files, threads=1, use_recorded=False).start()
    h.release_all()
    assert _result_within(h) == ("ok", _digests(files))
    assert os.path.getsize(files[0]) == 970


def test_hashlib_when_asked(tmp_path, monkeypatch):
    """MXCONV_SHA=hashlib (a bench knob): no compiled rounds run, every file is hashed alone with
    hashlib, and the digests are the same."""
    monkeypatch.setenv("MXCONV_SHA", "hashlib")
    assert sha256_pairs.compressor() is None
    monkeypatch.setattr(sha256_pairs, "step", lambda *a: _raise(AssertionError("compiled rounds run")))
    files = _files(tmp_path, _LENGTHS)
    h = hashing.SourceHasher(files, threads=2, use_recorded=False).start()
    h.release_all()
    assert _result_within(h) == ("ok", _digests(files))
    monkeypatch.delenv("MXCONV_SHA")
    monkeypatch.setenv("MXCONV_SHA", "compiled")  # anything else: the compiled rounds, where there are any
    assert (sha256_pairs.compressor() is None) == (_COMPRESS is None)
