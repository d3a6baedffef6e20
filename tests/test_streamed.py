"""Workers that write their MXFP8 bytes themselves as they make them (numerics/streamed.py,
stream.c; pieces.streamed): the file holds exactly the bytes the kernels give into a buffer, band
by band, for every instruction-set build; a kernel that declines leaves the piece to the usual
path; a failed write is a clean error; a conversion streamed is byte for byte the one that is not."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from test_native import lib  # noqa: F401  (the kernels of every instruction-set build)
from test_reliability import assert_same_tree

from converter.errors import OutputError
from converter.libc import libc
from converter.numerics.dispatch import quantize_mxfp8, requantize_fp8_block
from converter.numerics.streamed import quantize_bf16_to_file, requantize_fp8_to_file
from converter.run import execute, pieces
from converter.run.pipeline import convert

_AT = 4096 + 13  # an offset that is not a multiple of anything the kernels care about


def _fp8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0x7E  # no NaN code
    tiles = (-(-n // 128), -(-k // 128))
    s = torch.rand(tiles, generator=g) * torch.exp2(torch.randint(-20, 5, tiles, generator=g).float())
    return w.view(torch.float8_e4m3fn), s * torch.where(torch.rand(tiles, generator=g) < 0.3, -1.0, 1.0)


def _written(path, n: int, k: int) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    return data[:_AT], data[_AT:_AT + n * k]


@pytest.mark.parametrize("n, k, band_rows", [(300, 256, 128), (1000, 224, 256), (128, 7168, 128), (77, 96, 128)])
@pytest.mark.parametrize("rule", ["rceil", "floor"])
def test_fp8_bytes_written_band_by_band_are_the_kernels(lib, tmp_path, n, k, band_rows, rule):  # noqa: F811
    """Bands of 128 rows or more, a ragged last band and tile, columns not a multiple of 128."""
    w, s = _fp8(n, k, n + k)
    q, sc = requantize_fp8_block(w, s, rule)
    scales = torch.full((n * k // 32,), 0xAB, dtype=torch.uint8)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert requantize_fp8_to_file(w, s, rule, fd, _AT, scales, torch.empty(band_rows * k, dtype=torch.uint8))
    finally:
        os.close(fd)
    before, data = _written(path, n, k)
    assert before == bytes(_AT) and data == q.view(torch.uint8).numpy().tobytes()
    assert torch.equal(scales.view(n, k // 32), sc)


@pytest.mark.parametrize("n, k, band_rows", [(300, 256, 7), (5, 7168, 1), (64, 96, 64)])
def test_bf16_bytes_written_band_by_band_are_the_kernels(lib, tmp_path, n, k, band_rows):  # noqa: F811
    x = (torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 3).to(torch.bfloat16)
    q, sc = quantize_mxfp8(x)
    scales = torch.empty(n * k // 32, dtype=torch.uint8)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert quantize_bf16_to_file(x, "rceil", fd, _AT, scales, torch.empty(band_rows * k, dtype=torch.uint8))
    finally:
        os.close(fd)
    assert _written(path, n, k) == (bytes(_AT), q.view(torch.uint8).numpy().tobytes())
    assert torch.equal(scales.view(n, k // 32), sc)


def test_what_the_kernels_decline_is_left_to_the_caller(lib, tmp_path):  # noqa: F811
    """A NaN code in the last band, an Inf value, a band too small for one 128-row band: False,
    so that the piece runs its usual way (which raises or warns as the reference does)."""
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w, s = _fp8(300, 256, 1)
        scales = torch.empty(300 * 8, dtype=torch.uint8)
        band = torch.empty(128 * 256, dtype=torch.uint8)
        assert requantize_fp8_to_file(w, s, "rceil", fd, 0, scales, band)
        w.view(torch.uint8)[299, 3] = 0x7F
        assert not requantize_fp8_to_file(w, s, "rceil", fd, 0, scales, band)
        assert not requantize_fp8_to_file(w, s, "rceil", fd, 0, scales, band[:127 * 256])
        x = torch.ones(4, 64, dtype=torch.bfloat16)
        x[3, 5] = float("inf")
        assert not quantize_bf16_to_file(x, "rceil", fd, 0, torch.empty(8, dtype=torch.uint8), band)
    finally:
        os.close(fd)


def test_a_failed_write_raises_what_the_system_said(lib, tmp_path):  # noqa: F811
    (tmp_path / "out").write_bytes(b"")
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        w, s = _fp8(128, 128, 2)
        with pytest.raises(OSError) as e:
            requantize_fp8_to_file(w, s, "rceil", fd, 0, torch.empty(512, dtype=torch.uint8),
                                   torch.empty(128 * 128, dtype=torch.uint8))
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_workers_write_where_they_are_as_many_as_the_cores(monkeypatch):
    monkeypatch.setenv("MXCONV_CORE_SHARE", "4")
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert execute.workers_write([cpu] * 4) and execute.workers_write([cpu] * 5)
    assert not execute.workers_write([cpu] * 3) and not execute.workers_write([cpu, cpu, gpu, gpu])


@pytest.fixture
def plain_writes(monkeypatch):
    """Shards written with write(2) (as on tmpfs) wherever the test's folder is, workers writing;
    counts the pieces a worker wrote itself."""
    from converter.run import writer

    monkeypatch.setattr(writer, "open_direct", lambda path, size: None)
    monkeypatch.setattr(execute, "workers_write", lambda devices: True)
    count = {"streamed": 0}
    real = pieces.streamed

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        count["streamed"] += out is not None
        return out

    monkeypatch.setattr(pieces, "streamed", counted)
    return count


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_a_streamed_conversion_is_byte_for_byte_the_buffered_one(tiny_sources, tmp_path, monkeypatch, plain_writes,
                                                                 kind):
    src = tiny_sources[kind]
    monkeypatch.setattr(pieces, "_STREAMED", False)
    convert(src, tmp_path / "buffered", max_shard_size="2MB", quiet=True, processes=1, workers=2)
    assert plain_writes["streamed"] == 0
    monkeypatch.setattr(pieces, "_STREAMED", True)
    convert(src, tmp_path / "streamed", max_shard_size="2MB", quiet=True, processes=1, workers=2)
    assert plain_writes["streamed"] > 10
    assert_same_tree(tmp_path / "streamed", tmp_path / "buffered")


def test_a_streamed_write_that_fails_names_the_file_and_tensor(tiny_sources, tmp_path, monkeypatch, plain_writes):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pieces, "requantize_fp8_to_file", full)
    with pytest.raises(OutputError, match="write failed: No space left on device") as e:
        convert(tiny_sources["fp8"], tmp_path / "out", max_shard_size="2MB", quiet=True, processes=1, workers=2)
    assert e.value.tensor.endswith(".weight") and ".partial" in str(e.value.file)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_rows_a_worker_wrote_count_once_and_only_where_write2_writes(tmp_path):
    from converter.run.writer import ShardWriter
    from converter.sources.safetensors import PlannedTensor

    planned = [PlannedTensor("w", "F8_E4M3", (4, 64)), PlannedTensor("s", "U8", (4, 2))]
    mapped = ShardWriter(tmp_path / "m.safetensors", tmp_path / "m.partial", planned, mapped=True).__enter__()
    assert mapped.mapped and mapped.stream_target("w", 0, 4, 64) is None  # filled in place instead
    mapped.abort()
    w = ShardWriter(tmp_path / "a.safetensors", tmp_path / "a.partial", planned, direct=False, mapped=False)
    with w:
        fd, at, lock = w.stream_target("w", 2, 2, 64)
        assert fd == w.fd and at == w.offsets["w"] + 2 * 64 and lock == w.turn.address
        for wrong in (("nope", 0, 1, 64), ("w", 3, 2, 64), ("w", 0, 1, 32), ("s", 0, 1, 64)):
            assert w.stream_target(*wrong) is None  # not planned; past the end; other row widths
        os.pwrite(fd, bytes(range(128)), at)
        w.record_rows("w", 2, 2)
        with pytest.raises(OutputError, match="written twice"):
            w.record_rows("w", 3, 1)
        with pytest.raises(OutputError, match="not planned"):
            w.record_rows("w", 3, 2)
        w.write_rows("w", 0, torch.zeros(2, 64, dtype=torch.float8_e4m3fn))
        w.write("s", torch.ones(4, 2, dtype=torch.uint8))
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data[w.offsets["w"]:w.offsets["w"] + 256] == bytes(128) + bytes(range(128))
    w = ShardWriter(tmp_path / "b.safetensors", tmp_path / "b.partial", planned, direct=False, mapped=False)
    with pytest.raises(OutputError, match="never written"):
        with w:
            w.record_rows("w", 0, 3)  # one row short
            w.write("s", torch.ones(4, 2, dtype=torch.uint8))
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "b.partial").exists()


def test_workers_writing_one_file_take_turns_on_its_mutex(lib, tmp_path):  # noqa: F811
    """The kernels hold the shard's mutex for each write: while it is held elsewhere, they do not
    write (they wait asleep, not spinning on the file's lock in the kernel), then they do."""
    import threading

    from converter.run.writer import ShardWriter
    from converter.sources.safetensors import PlannedTensor

    w, s = _fp8(256, 128, 3)
    planned = [PlannedTensor("w", "F8_E4M3", (256, 128)), PlannedTensor("s", "U8", (256, 4))]
    with ShardWriter(tmp_path / "a.safetensors", tmp_path / "a.partial", planned, direct=False, mapped=False) as out:
        fd, at, lock = out.stream_target("w", 0, 256, 128)
        scales = torch.empty(256 * 4, dtype=torch.uint8)
        job = threading.Thread(target=requantize_fp8_to_file,
                               args=(w, s, "rceil", fd, at, scales, torch.empty(128 * 128, dtype=torch.uint8), lock))
        c = libc()
        c.pthread_mutex_lock(lock)  # held here, as by another worker writing
        try:
            job.start()
            job.join(0.5)
            assert job.is_alive() and (tmp_path / "a.partial").read_bytes()[at:].count(0) == 256 * 132
        finally:
            c.pthread_mutex_unlock(lock)
        job.join(30)
        out.record_rows("w", 0, 256)
        out.write("s", scales.view(256, 4))
    q, sc = requantize_fp8_block(w, s)
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data[at:at + 256 * 128] == q.view(torch.uint8).numpy().tobytes() and torch.equal(scales.view(256, 4), sc)
