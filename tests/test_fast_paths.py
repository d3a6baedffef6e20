"""The performance paths (GitHub issue 7) against the reference: fast kernels, O_DIRECT shard
writes, row pieces. Every test here compares bytes, never just shapes."""

from __future__ import annotations

import math
import os
import random
import threading
import time

import pytest
import torch
from helpers import load_all, same_bytes
from mutate import clone, edit_tensors, put_nan
from reference import reference_fp8_dequant, reference_mxfp8

import converter
from converter.errors import NumericsError
from converter.numerics import kernels
from converter.numerics.dispatch import (
    dequantize_fp8_block,
    quantize_mxfp8,
    requantize_fp8_block,
)
from converter.run import direct_io, pieces
from converter.run.writer import ShardWriter
from converter.sources.safetensors import PlannedTensor, build_header


def _adversarial_bf16(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows at exponents from 2^-140 to 2^120, zero blocks, subnormals, ties, and rows
    of random finite bit patterns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-140, 120, (n, 1), generator=g).float())
    if k >= 64:
        x[:, :32] = 0
        x[0, 40] = 2.0**-133
        x[min(1, n - 1), 33:40] = torch.tensor([1.0, 1.0625, 1.1875, 448.0, -448.0, 1.75, 1.9])
    xb = x.to(torch.bfloat16)
    bits = torch.randint(-32768, 32767, (n, k), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    rows = slice(2, min(n, 6))
    xb[rows] = torch.where(torch.isfinite(bits[rows]), bits[rows], torch.zeros_like(bits[rows]))
    return xb



@pytest.mark.parametrize("rule", ["rceil", "floor"])
@pytest.mark.parametrize("shape", [(7, 64), (300, 7168), (129, 2048), (1, 32), (4, 3, 96)])
def test_bf16_kernel_matches_the_reference(monkeypatch, backend, rule, shape):
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 4096)  # many chunks, a ragged last one
    x = _adversarial_bf16(int(torch.tensor(shape[:-1]).prod()), shape[-1], seed=len(shape) + shape[-1])
    x = x.view(shape)
    q, s = quantize_mxfp8(x, rule)  # dispatches to kernels.quantize_bf16
    ref_q, ref_s = quantize_mxfp8(x.float(), rule)  # float32 input: the reference path, same values
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    if x.numel() <= 1 << 16:  # and the independent reference, where it is fast enough
        rq, rs = reference_mxfp8(x, rule)
        assert torch.equal(q.view(torch.uint8), rq) and torch.equal(s, rs)


def _fp8_source(n: int, k: int, seed: int, scale_exp: tuple[int, int] = (-20, 4)):
    from converter.models.demo import quantize_fp8_block

    g = torch.Generator().manual_seed(seed)
    w, s = quantize_fp8_block(torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-30, 30, (n, 1), generator=g).float()))
    s = s * torch.exp2(torch.randint(*scale_exp, s.shape, generator=g).float())
    return w, s * torch.where(torch.rand(s.shape, generator=g) < 0.1, -1.0, 1.0)  # a few negative scales


@pytest.mark.parametrize("rule", ["rceil", "floor"])
@pytest.mark.parametrize("shape", [(256, 512), (576, 7168 // 4), (300, 160), (129, 96)])
def test_fp8_kernels_match_deepseek_dequant_then_quantize(monkeypatch, backend, rule, shape):
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 4096)
    w, s = _fp8_source(*shape, seed=shape[0])
    ref_bf16 = reference_fp8_dequant(w, s)
    assert same_bytes(dequantize_fp8_block(w, s), ref_bf16)
    q, sc = requantize_fp8_block(w, s, rule)
    ref_q, ref_s = quantize_mxfp8(ref_bf16.float(), rule)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(sc, ref_s)


@pytest.mark.parametrize("scale", [2.0**-125, 2.0**-149, -(2.0**110), 0.0, float("inf"), float("nan")])
def test_fp8_scales_outside_the_fast_range_fall_back_exactly(backend, scale):
    """The torch kernel models scales in [2^-117, 2^100]; the compiled one every finite scale.
    Outside what a kernel models it declines, and the result is still the reference."""
    w, s = _fp8_source(256, 256, seed=5)
    s[1, 0] = scale
    modelled = math.isfinite(scale) and (backend == "native" or 2.0**-117 <= abs(scale) <= 2.0**100)
    assert (kernels.requantize_fp8(w, s, "rceil") is not None) == modelled
    ref = reference_fp8_dequant(w, s)
    assert same_bytes(dequantize_fp8_block(w, s), ref)  # ...and the result is still the reference
    if torch.isfinite(ref.float()).all():
        q, sc = requantize_fp8_block(w, s)
        rq, rs = quantize_mxfp8(ref.float())
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sc, rs)


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_fp8_nan_code_is_the_same_error_as_the_reference(backend, code):
    w, s = _fp8_source(256, 256, seed=6)
    w.view(torch.uint8)[130, 70] = code
    with pytest.raises(NumericsError, match=r"block \(130, 2\)"):
        requantize_fp8_block(w, s, name="t")


def test_out_buffers_are_filled_and_returned(backend):
    x = _adversarial_bf16(64, 256, seed=7)
    q0, s0 = quantize_mxfp8(x)
    q, s = torch.empty_like(q0), torch.empty_like(s0)
    q1, s1 = quantize_mxfp8(x, out=(q, s))
    assert q1.data_ptr() == q.data_ptr() and s1.data_ptr() == s.data_ptr()
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)


@pytest.mark.parametrize("direct,mapped", [(True, False), (False, False), (False, True)])
def test_shard_writer_assembles_any_order_any_alignment(tmp_path, direct, mapped):
    """Tensors and row pieces of odd sizes, written from 4 threads in random order, some from
    memory at the right O_DIRECT phase and some not, or (mapped) some filled in place: the file
    is the header then the bytes."""
    rng = random.Random(11)
    planned = [PlannedTensor(f"t{i}", "U8", (rng.randint(1, 40), rng.choice([1, 7, 100, 4096, 5000])))
               for i in range(40)]
    data = {t.name: torch.randint(0, 256, t.shape, dtype=torch.uint8) for t in planned}
    parts = []
    for t in planned:  # whole tensors and row pieces
        rows = t.shape[0]
        cut = sorted(rng.sample(range(1, rows), min(rows - 1, rng.randint(0, 3)))) if rows > 1 else []
        for a, b in zip([0] + cut, cut + [rows]):
            parts.append((t.name, a, b))
    rng.shuffle(parts)
    with ShardWriter(tmp_path / "s.safetensors", tmp_path / "s.partial", planned, direct=direct, mapped=mapped) as w:
        assert (w.direct is not None) == (direct and direct_io.open_direct(tmp_path / "probe", 1) is not None)
        assert w.mapped == mapped
        # write(2) into the file serializes its writers (the executor then has them take turns);
        # O_DIRECT writes and a mapping do not. (direct=True falls back to write(2) without O_DIRECT.)
        assert w.one_at_a_time == {(True, False): w.direct is None, (False, False): True,
                                   (False, True): False}[(direct, mapped)]

        def write(chunk):
            for name, a, b in chunk:
                src = data[name][a:b]
                if mapped and rng.random() < 0.5:  # filled in place, then recorded without a copy
                    region = w.region(name, a, b - a)
                    src = region.view(src.shape).copy_(src)
                elif rng.random() < 0.5:  # at the phase that lets O_DIRECT take it without a copy
                    base = torch.empty(src.numel() + 4096, dtype=torch.uint8)
                    skip = (w.phase(name, a) - base.data_ptr()) % 4096
                    src = base[skip:skip + src.numel()].view(src.shape).copy_(src)
                if a == 0 and b == len(data[name]):
                    w.write(name, src)
                else:
                    w.write_rows(name, a, src)

        threads = [threading.Thread(target=write, args=(parts[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    header, _ = build_header(planned)
    expected = header + b"".join(data[t.name].numpy().tobytes() for t in planned)
    assert (tmp_path / "s.safetensors").read_bytes() == expected


def test_shard_writer_refuses_overlapping_rows(tmp_path):
    planned = [PlannedTensor("t", "U8", (10, 3))]
    with pytest.raises(Exception, match="written twice"):
        with ShardWriter(tmp_path / "s", tmp_path / "p", planned) as w:
            w.write_rows("t", 0, torch.zeros(6, 3, dtype=torch.uint8))
            w.write_rows("t", 5, torch.zeros(5, 3, dtype=torch.uint8))
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def unsplit(tiny_sources, tmp_path_factory):
    out = {}
    for name in ("bf16", "fp8", "fp8_ue8m0"):
        dst = tmp_path_factory.mktemp("unsplit") / name
        converter.convert(tiny_sources[name], dst, quiet=True)
        out[name] = dst
    return out


@pytest.mark.parametrize("source", ["bf16", "fp8", "fp8_ue8m0"])
@pytest.mark.parametrize("workers", [1, 3])
def test_row_pieces_give_the_same_bytes(tiny_sources, unsplit, tmp_path, monkeypatch, source, workers):
    monkeypatch.setattr(pieces, "PIECE_BYTES", 2000)  # tiny pieces: every 2-D tensor is cut
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 1000)
    calls = []
    real = pieces.split
    monkeypatch.setattr(pieces, "split", lambda *a: calls.append(len(r := real(*a))) or r)
    import converter.run.execute as ex
    monkeypatch.setattr(ex, "split", pieces.split)
    converter.convert(tiny_sources[source], tmp_path / "o", quiet=True, workers=workers, max_shard_size="300KB")
    assert max(calls) > 4  # really cut
    got, want = load_all(tmp_path / "o"), load_all(unsplit[source])
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_bytes(got[name], want[name]), name


def test_nan_in_a_later_piece_names_the_block_of_the_whole_tensor(tiny_sources, tmp_path, monkeypatch):
    src = clone(tiny_sources["bf16"], tmp_path / "src")
    name = "model.layers.0.mlp.down_proj.weight"  # 256 x 384
    edit_tensors(src, put_nan(name, row=200, col=70))
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4096)
    with pytest.raises(NumericsError, match=r"block \(200, 2\)") as err:
        converter.convert(src, tmp_path / "o", quiet=True, workers=2)
    assert name in str(err.value)


def test_o_direct_unavailable_falls_back_to_buffered_writes(tiny_sources, unsplit, tmp_path, monkeypatch):
    import converter.run.writer as sio

    monkeypatch.setattr(sio, "open_direct", lambda path, size: None)
    converter.convert(tiny_sources["fp8"], tmp_path / "o", quiet=True, workers=2)
    got, want = load_all(tmp_path / "o"), load_all(unsplit["fp8"])
    assert all(same_bytes(got[n], want[n]) for n in want) and sorted(got) == sorted(want)


@pytest.mark.parametrize("source", ["bf16", "fp8", "fp8_ue8m0"])
def test_mapped_shards_filled_in_place_give_the_same_bytes(tiny_sources, unsplit, tmp_path, monkeypatch, source):
    """On tmpfs shards are written through mappings, the kernels' outputs and copied tensors in
    place (here forced on any file system): the same bytes, and most bytes really in place."""
    import converter.run.writer as sio

    monkeypatch.setattr(sio, "in_memory_fs", lambda path: True)
    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "1")  # mapped even with several shards in flight
    monkeypatch.setattr(pieces, "PIECE_BYTES", 2000)
    copied = []
    real_map = sio.ShardWriter._map
    monkeypatch.setattr(sio.ShardWriter, "_map", lambda self, offset, n: copied.append(n) or real_map(self, offset, n))
    converter.convert(tiny_sources[source], tmp_path / "o", quiet=True, workers=3, max_shard_size="300KB")
    got, want = load_all(tmp_path / "o"), load_all(unsplit[source])
    assert sorted(got) == sorted(want)
    for name in want:
        assert same_bytes(got[name], want[name]), name
    written = sum(p.stat().st_size for p in (tmp_path / "o").glob("*.safetensors"))
    assert sum(copied) > 0.9 * written  # through the mapping
    if source != "fp8_ue8m0":  # (the lossless re-layout returns new tensors: copied into place)
        assert sum(copied) < 1.2 * written  # each byte mapped once (filled in place), not twice (then copied)


def test_a_shard_that_would_not_fit_is_not_mapped(tmp_path, monkeypatch):
    """Running out of room in a mapped file kills the process (SIGBUS); write(2) fails cleanly."""
    import converter.run.writer as sio

    planned = [PlannedTensor("t", "U8", (10, 3))]
    monkeypatch.setattr(sio, "in_memory_fs", lambda path: True)
    with ShardWriter(tmp_path / "a", tmp_path / "a.partial", planned) as w:
        assert w.mapped
        w.write("t", torch.ones(10, 3, dtype=torch.uint8))
    monkeypatch.setattr(sio, "_free_bytes", lambda folder: 100)
    with ShardWriter(tmp_path / "b", tmp_path / "b.partial", planned) as w:
        assert not w.mapped
        w.write("t", torch.ones(10, 3, dtype=torch.uint8))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "0")  # the executor's choice: even one shard by 16 writers
    monkeypatch.setattr(sio, "_free_bytes", lambda folder: 1 << 40)
    from converter.run.execute import _mapping

    with ShardWriter(tmp_path / "c", tmp_path / "c.partial", planned, mapped=_mapping(1, 16)) as w:
        assert not w.mapped and w.direct is None  # no O_DIRECT in memory: no page cache to bypass
        w.write("t", torch.ones(10, 3, dtype=torch.uint8))
    monkeypatch.setattr(sio, "in_memory_fs", lambda path: False)
    with ShardWriter(tmp_path / "d", tmp_path / "d.partial", planned) as w:
        assert not w.mapped and (w.direct is not None or sio.open_direct(tmp_path / "probe", 1) is None)
        w.write("t", torch.ones(10, 3, dtype=torch.uint8))
    assert (tmp_path / "c").read_bytes() == (tmp_path / "d").read_bytes() == (tmp_path / "a").read_bytes()


def test_memory_file_systems_are_recognized(tmp_path, monkeypatch):
    """The longest matching mount point decides (with escaped spaces); unreadable mounts: False."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
                      "tmpfs /data/my\\040fast tmpfs rw 0 0\n/dev/vdb /data ext4 rw 0 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(mounts if f == "/proc/self/mounts" else f, *a, **k))
    assert direct_io.in_memory_fs("/dev/shm/mxconv/x")
    assert direct_io.in_memory_fs("/data/my fast/shard")
    assert not direct_io.in_memory_fs("/data/slow/shard") and not direct_io.in_memory_fs("/dev/shmx")
    mounts.unlink()
    assert direct_io.in_memory_fs("/dev/shm") is False  # cannot be read: never raises


def test_file_smaller_than_a_block_and_odd_sizes(tmp_path):
    for size in (1, 7, 4095, 4096, 4097, 12289):
        path = tmp_path / f"f{size}"
        f = direct_io.open_direct(path, size)
        if f is None:
            pytest.skip("no O_DIRECT on this file system")
        payload = torch.randint(0, 256, (size,), dtype=torch.uint8)
        cut = size // 3
        f.write(payload[cut:], cut)
        f.write(payload[:cut], 0)
        f.close()
        os.close(f.fd)
        assert path.read_bytes() == payload.numpy().tobytes()


def test_early_source_hash_is_adopted_and_rechecked(tiny_sources, tmp_path):
    """Hashing started before torch is imported is reused, unless a file changed since."""
    import hashlib

    from converter.sources.hashing import SourceHasher, start_early

    src = clone(tiny_sources["bf16"], tmp_path / "src")
    files = sorted(src.glob("*.safetensors"))
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    start_early(src)
    h = SourceHasher(files).start()
    assert h.adopted is not None and h.result() == want
    start_early(src)
    h = SourceHasher(files).start()
    os.utime(files[0], ns=(1, 1))  # "changed" after the early start: hashed again
    assert h.result() == want and h.adopted is None


@pytest.mark.parametrize("mappable", [True, False])
def test_source_hash_in_windows_or_by_reading(tmp_path, monkeypatch, mappable):
    """sha256 of files hashed in mmap windows (several windows, a ragged last one, an empty file)
    and, where a file system refuses mmap, by reading: the same digests as hashlib's."""
    import hashlib

    from converter.sources import hashing as source_hash

    monkeypatch.setattr(source_hash, "_WINDOW", 1 << 16)
    if not mappable:
        def refuse(*args, **kwargs):
            raise OSError("mmap refused")
        monkeypatch.setattr(source_hash.mmap, "mmap", refuse)
    files = []
    for i, size in enumerate([0, 1, (1 << 16) * 3 + 123]):
        (p := tmp_path / f"f{i}").write_bytes(os.urandom(size))
        files.append(p)
    got = source_hash.SourceHasher(files).start().result()
    assert got == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_mxfp8_dequant_every_code_under_every_scale_byte():
    """The half-trick decode against torch's own float8 cast: all 254 non-NaN codes under all 255
    scale bytes, float32 bit patterns equal (-0, subnormals, Inf from 448 * 2^127); a NaN code
    takes the reference path and stays NaN."""
    from converter.numerics.dispatch import dequantize_mxfp8
    from converter.numerics.reference import e8m0_to_float

    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    data = torch.cat([codes.repeat(255, 1), torch.zeros(255, 2, dtype=torch.uint8)], 1).view(torch.float8_e4m3fn)
    scale = torch.arange(255, dtype=torch.uint8).view(255, 1).repeat(1, 8)
    want = data.to(torch.float32) * e8m0_to_float(scale).repeat_interleave(32, dim=-1)
    assert torch.equal(kernels.dequantize_mxfp8(data, scale).view(torch.int32), want.view(torch.int32))
    data.view(torch.uint8)[3, 5] = 0xFF
    assert kernels.dequantize_mxfp8(data, scale) is None and bool(torch.isnan(dequantize_mxfp8(data, scale)[3, 5]))


def test_source_files_are_hashed_as_the_conversion_reaches_them(tiny_sources, tmp_path, monkeypatch):
    """The hasher waits for each file until the conversion reads it (so a checkpoint larger than
    the page cache is read from disk once), and result() hashes whatever was never read."""
    import hashlib

    from converter.sources import hashing as source_hash

    monkeypatch.setattr(source_hash, "cached", lambda path: False)  # as on a cold disk
    src = clone(tiny_sources["fp8"], tmp_path / "src")
    files = sorted(src.glob("*.safetensors"))
    h = source_hash.SourceHasher(files)._launch()
    h.release(files[1])
    h.futures[files[1]].result(timeout=10)
    assert list(h.hashes) == [files[1].name]  # the others wait
    assert h.result() == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    released = []
    real = source_hash.SourceHasher.release
    monkeypatch.setattr(source_hash.SourceHasher, "release", lambda self, p: released.append(p) or real(self, p))
    converter.convert(src, tmp_path / "o", quiet=True, workers=2)
    assert sorted(released) == files  # every file, announced by the reader, once


def test_files_whole_in_the_page_cache_are_hashed_at_once(tiny_sources, tmp_path, monkeypatch):
    """A file whose every page is cached is hashed without waiting for the conversion to reach
    it (no disk read is duplicated); the others still wait. `cached` is mincore(2): a file just
    written is cached; dropped from the cache (where the file system allows), it is not."""
    import hashlib

    from converter.run.direct_io import in_memory_fs
    from converter.sources import hashing as source_hash

    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(os.urandom(1 << 20))
    assert source_hash.cached(fresh)
    if not in_memory_fs(tmp_path):
        with open(fresh, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert not source_hash.cached(fresh)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert source_hash.cached(empty) and not source_hash.cached(tmp_path / "missing")

    src = clone(tiny_sources["fp8"], tmp_path / "src")
    files = sorted(src.glob("*.safetensors"))
    monkeypatch.setattr(source_hash, "cached", lambda path: path != files[0])
    h = source_hash.SourceHasher(files)._launch()
    for p in files[1:]:
        deadline = time.monotonic() + 10
        while p not in h.futures and time.monotonic() < deadline:
            time.sleep(0.01)
        h.futures[p].result(timeout=10)
    assert sorted(h.hashes) == sorted(p.name for p in files[1:])  # the first one waits for the conversion
    assert h.result() == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_file_evicted_while_queued_waits_for_the_conversion(tiny_sources, tmp_path, monkeypatch):
    """Queued because it was cached, evicted before its turn (a source larger than memory): not
    read from disk by the hasher, but hashed once the conversion releases it, or by result()."""
    import hashlib

    from converter.sources import hashing as source_hash

    src = clone(tiny_sources["fp8"], tmp_path / "src")
    files = sorted(src.glob("*.safetensors"))
    seen = {p: 0 for p in files}

    def cached_then_evicted(path):  # cached at the launch scan, gone when its turn comes
        seen[path] += 1
        return seen[path] == 1

    monkeypatch.setattr(source_hash, "cached", cached_then_evicted)
    h = source_hash.SourceHasher(files, threads=1)._launch()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # each file checked again at its turn, and the thread back waiting:
        with h.lock:                    # done with the last one (seen at 2 comes before its future goes)
            if all(n == 2 for n in seen.values()) and h.idle == 1:
                break
        time.sleep(0.01)
    assert all(n == 2 for n in seen.values()) and not h.hashes and not h.futures  # none hashed ahead
    h.release(files[1])
    h.futures[files[1]].result(timeout=10)
    assert list(h.hashes) == [files[1].name]
    assert h.result() == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_mincore_is_not_trusted_for_a_file_it_would_lie_about(tmp_path, monkeypatch):
    """To a user who neither owns nor may write a file, Linux's mincore (5.2 and later) reports
    every page resident; `cached` must then say it cannot tell (False), so a shared read-only
    model store is not hashed ahead of the conversion (and read from disk twice). A resident
    file, seen as another user: False; as its owner, or with write access, or as root: True."""
    from converter.sources import hashing as source_hash

    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(1 << 16))
    owner = data.stat().st_uid
    assert source_hash.cached(data)
    monkeypatch.setattr(source_hash.os, "geteuid", lambda: owner + 1 if owner else 12345)
    monkeypatch.setattr(source_hash.os, "access", lambda path, mode, **kw: False)
    assert not source_hash.cached(data)
    monkeypatch.setattr(source_hash.os, "access", lambda path, mode, **kw: mode == os.W_OK)
    assert source_hash.cached(data)
    monkeypatch.setattr(source_hash.os, "access", lambda path, mode, **kw: False)
    monkeypatch.setattr(source_hash.os, "geteuid", lambda: owner)
    assert source_hash.cached(data)


@pytest.mark.parametrize("memory, ahead", [(0, 1), (10**12, 3)])
def test_early_hashing_runs_ahead_only_within_a_quarter_of_free_memory(tiny_sources, tmp_path, monkeypatch,
                                                                        memory, ahead):
    from converter.sources import hashing as source_hash

    src = clone(tiny_sources["fp8"], tmp_path / "src")
    monkeypatch.setattr(source_hash, "cached", lambda path: False)  # as on a cold disk
    monkeypatch.setattr(source_hash, "_available_memory", lambda: memory)
    source_hash.start_early(src)
    (early,) = [h for key, h in source_hash._early.items() if str(src.resolve()) in key[0]]
    assert len(early.futures) == ahead  # the first shard always; all of them with memory to spare
    source_hash.SourceHasher(sorted(src.glob("*.safetensors"))).start().result()  # adopts and finishes it
