"""Numerics inputs mapped from the page cache instead of read into buffers
(`safetensors.map_tensor`, `pieces.load`): the same bytes, cached or not and whoever owns the
file, never a crash on a short file, never a write into the source, no mapping left behind."""

from __future__ import annotations

import gc
import json
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import converter
from converter.errors import SourceError
from converter.numerics import native
from converter.run.pieces import BufferPool, check_mapped, mapping_reads
from converter.sources import safetensors as st
from converter.sources.safetensors import map_tensor, read_header, read_tensor
from helpers import same_bytes


def _write(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> Path:
    """A safetensors file laid out by hand: tensors back to back in the order given (so a tensor
    may start at an offset its dtype's size does not divide)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(512, 1024, generator=g).to(torch.bfloat16)  # 1 MB: spans many pages
    scales = torch.rand(4, 8, generator=g)
    return _write(tmp_path / "a.safetensors", [
        ("big", "BF16", [512, 1024], big.view(torch.uint8).numpy().tobytes()),
        ("scales", "F32", [4, 8], scales.numpy().tobytes()),
        ("odd", "U8", [3], b"\x01\x02\x03"),
        ("after_odd", "BF16", [2], torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()),
    ])


def _maps(path: Path) -> int:
    """Mappings of `path` in this process (by name: an address alone may be reused by another)."""
    return sum(line.endswith(" " + str(path)) for line in Path("/proc/self/maps").read_text().splitlines())


def _needs_native() -> None:
    """Skip where there is no C compiler (no compiled library, no note); fail where there is one
    and the library did not build."""
    if native._compiler() is None:
        pytest.skip("no C compiler here: no compiled library, no note")
    assert native.load() is not None, "the compiled library did not build"


def test_mapped_bytes_are_the_read_bytes(shard):
    infos, _ = read_header(shard)
    for name in ("big", "scales"):
        mapped = map_tensor(infos[name])
        assert mapped is not None, f"{name}: just written, so in the page cache, yet not mapped"
        assert same_bytes(mapped, read_tensor(infos[name]))


def test_a_tensor_at_an_offset_its_dtype_does_not_divide_is_read_instead(shard):
    infos, _ = read_header(shard)
    assert infos["after_odd"].start % 2 == 1
    assert map_tensor(infos["after_odd"]) is None
    expect = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    assert same_bytes(read_tensor(infos["after_odd"]), expect)


def test_mappings_hold_no_file_descriptors(shard):
    """A descriptor per mapped piece would run a model of small tensors into the open-file limit."""
    infos, _ = read_header(shard)
    before = len(os.listdir("/proc/self/fd"))
    held = [map_tensor(infos["big"]) for _ in range(50)]
    assert all(t is not None for t in held)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_file_cut_short_after_mapping_is_an_error_before_the_bytes_are_read(shard):
    """`check_mapped` runs just before the numerics: a file copied over since its tensors were
    mapped is reported as changed, not read (which would end the process with SIGBUS)."""
    infos, _ = read_header(shard)
    inputs = {"big": map_tensor(infos["big"])}
    storage = inputs["big"].untyped_storage()
    mapped = [("big", shard, infos["big"].end, storage.data_ptr(), storage.nbytes())]
    check_mapped(mapped)  # whole: nothing to say
    os.truncate(shard, 4096)
    with pytest.raises(SourceError, match="changed while it was being converted") as err:
        check_mapped(mapped)
    assert err.value.file == str(shard) and err.value.tensor == "big"


def _run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_bus_error_says_what_happened(shard):
    """Cut short while the bytes are read (the window `check_mapped` leaves): the process still
    dies of SIGBUS, but says why on the way out (mxconv's own command arranges that)."""
    _needs_native()
    done = _run_python(f"""
import os, sys
from converter.numerics import native
from converter.sources.safetensors import map_tensor, read_header
assert native.note_sigbus("a source file was cut short\\n")
info = read_header({str(shard)!r})[0]["big"]
t = map_tensor(info)
os.truncate({str(shard)!r}, 4096)
print(int(t.view(-1)[-1]))
""")
    assert done.returncode == -signal.SIGBUS, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "a source file was cut short"


def test_a_bus_error_sent_from_outside_is_not_taken_for_a_cut_short_file():
    _needs_native()
    done = _run_python("""
import os, signal
from converter.numerics import native
assert native.note_sigbus("a source file was cut short\\n")
os.kill(os.getpid(), signal.SIGBUS)
print("still alive")
""")
    assert done.returncode == -signal.SIGBUS and "cut short" not in done.stderr and "alive" not in done.stdout


def test_the_note_leaves_faulthandler_its_traceback(shard):
    _needs_native()
    done = _run_python(f"""
import faulthandler, os
faulthandler.enable()
from converter.numerics import native
from converter.sources.safetensors import map_tensor, read_header
assert native.note_sigbus("a source file was cut short\\n")
t = map_tensor(read_header({str(shard)!r})[0]["big"])
os.truncate({str(shard)!r}, 4096)
print(int(t.view(-1)[-1]))
""")
    assert done.returncode == -signal.SIGBUS
    assert "a source file was cut short" in done.stderr and "Fatal Python error: Bus error" in done.stderr


@pytest.mark.parametrize("precision", ["fp8", "fp8_ue8m0"])
def test_the_executor_checks_mapped_files_before_it_reads_or_writes_them(tiny_sources, tmp_path, monkeypatch,
                                                                         precision):
    """Wired in: the workers check every piece's mappings before the numerics, and the writers
    before writing outputs that are mapped inputs (UE8M0 weights pass through unchanged)."""
    import threading

    import converter.run.execute as execute_module

    seen: list[tuple[str, int]] = []
    real = execute_module.check_mapped

    def spy(mapped):
        seen.append((threading.current_thread().name.rsplit("-", 1)[0], len(mapped)))
        real(mapped)

    monkeypatch.setattr(execute_module, "check_mapped", spy)
    converter.convert(tiny_sources[precision], tmp_path / "out", quiet=True, processes=1)
    assert any(n for who, n in seen if who == "mxconv-work")
    # writers check only outputs that are mapped inputs: UE8M0 weights, never FP8's requantized ones
    assert any(n for who, n in seen if who == "mxconv-write") == (precision == "fp8_ue8m0")


def test_a_mapping_whose_file_was_cut_short_is_known_by_the_mapping_itself(shard, tmp_path):
    """A file cut short and another renamed over its path: the path looks whole, the mapping is not."""
    from converter.sources.safetensors import mapping_intact

    infos, _ = read_header(shard)
    t = map_tensor(infos["big"])
    storage = t.untyped_storage()
    whole = shard.read_bytes()
    os.truncate(shard, 4096)
    (tmp_path / "again").write_bytes(whole)
    os.replace(tmp_path / "again", shard)
    assert shard.stat().st_size >= infos["big"].end
    assert not mapping_intact(storage.data_ptr(), storage.nbytes(), shard, infos["big"].end)


def test_a_file_cut_short_after_planning_is_not_mapped(shard):
    """Mapped past the end of the file, the bytes would kill the process with SIGBUS; the read
    instead names the file and tensor."""
    infos, _ = read_header(shard)
    os.truncate(shard, infos["big"].end - 4096)
    assert map_tensor(infos["big"]) is None
    with pytest.raises(SourceError, match="truncated"):
        read_tensor(infos["big"])


def test_bytes_not_in_the_page_cache_are_asked_for_then_mapped(shard, monkeypatch):
    """Pages dropped from the page cache are mapped all the same, after one POSIX_FADV_WILLNEED
    over the mapped range (their reads go out at once, not one fault at a time), and come back
    with the file's bytes."""
    infos, _ = read_header(shard)
    with open(shard, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: advised.append((at, n, advice)) or real(
        fd, at, n, advice))
    mapped = map_tensor(infos["big"])
    assert mapped is not None
    info = infos["big"]
    assert advised == [(0, info.end, os.POSIX_FADV_WILLNEED)]  # from the page holding its first byte
    assert mapped.view(torch.uint8).flatten().numpy().tobytes() == shard.read_bytes()[info.start:info.end]


def test_pages_that_cannot_be_brought_in_are_read_instead(shard, monkeypatch):
    """MADV_POPULATE_READ failing with EFAULT (a disk read error, or the file cut short since it
    was looked at) would be SIGBUS in the numerics: nothing is mapped, and the read that follows
    says what is wrong."""
    import ctypes
    import errno

    real = st.libc()

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def madvise(self, address, length, advice):
            ctypes.set_errno(errno.EFAULT)
            return -1

    monkeypatch.setattr(st, "libc", lambda: Failing())
    infos, _ = read_header(shard)
    assert map_tensor(infos["big"]) is None

    class Old(Failing):  # before Linux 5.14: no such advice (EINVAL), the pages fault in as read
        def madvise(self, address, length, advice):
            ctypes.set_errno(errno.EINVAL)
            return -1

    monkeypatch.setattr(st, "libc", lambda: Old())
    assert same_bytes(map_tensor(infos["big"]), read_tensor(infos["big"]))


def test_a_mapping_that_fails_on_a_whole_file_is_a_read_error(shard, monkeypatch):
    """`check_mapped` tells a file cut short from one whose pages no longer read back."""
    from converter.run import pieces

    monkeypatch.setattr(pieces, "mapping_intact", lambda address, length, file, end: False)
    infos, _ = read_header(shard)
    entry = [("big", shard, infos["big"].end, 0, 0)]
    with pytest.raises(SourceError, match="read failed: a page of its bytes could not be read") as err:
        check_mapped(entry)
    assert err.value.file == str(shard) and err.value.tensor == "big"
    os.truncate(shard, infos["big"].end - 1)
    with pytest.raises(SourceError, match="changed while it was being converted"):
        check_mapped(entry)


def test_advice_the_file_system_refuses_does_not_stop_the_mapping(shard, monkeypatch):
    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    infos, _ = read_header(shard)
    assert same_bytes(map_tensor(infos["big"]), read_tensor(infos["big"]))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read the file as another user")
def test_a_file_owned_by_someone_else_is_mapped_too():
    """mincore(2) tells the residency of another user's file falsely (every page resident), and
    cachestat(2) refuses it; mapping needs neither, so a shared checkpoint that another user
    owns (read-only to us) is mapped like our own. Checked in a child that becomes `nobody`."""
    folder = Path(tempfile.mkdtemp(prefix="mxconv-shared-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        data = bytes(range(256)) * 1024
        path = _write(folder / "a.safetensors", [("w", "BF16", [256, 512], data)])
        os.chmod(path, 0o444)
        info = read_header(path)[0]["w"]
        pid = os.fork()
        if pid == 0:  # the child: only system calls and byte copies (no torch thread pools)
            code = 1
            try:
                try:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                except OSError:
                    code = 4  # no other user to become here (no CAP_SETUID, or a user namespace)
                else:
                    if os.access(path, os.W_OK) or os.stat(path).st_uid == os.geteuid():
                        code = 2
                    else:
                        t = map_tensor(info)
                        code = 0 if t is not None and t.view(torch.uint8).flatten().numpy().tobytes() == data else 3
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child reading as another user did not finish in 60 s")
        code = os.waitstatus_to_exitcode(done[1])
        if code == 4:
            pytest.skip("cannot become another user here")
        assert code == 0  # 3: not mapped, or other bytes
    finally:
        shutil.rmtree(folder)


def test_writing_into_a_mapped_tensor_never_reaches_the_file(shard):
    before = shard.read_bytes()
    infos, _ = read_header(shard)
    mapped = map_tensor(infos["big"])
    mapped.view(torch.uint8).fill_(0)
    del mapped
    gc.collect()
    assert shard.read_bytes() == before


def test_the_mapping_lives_exactly_as_long_as_its_tensors(shard):
    infos, _ = read_header(shard)
    mapped = map_tensor(infos["big"])
    expect = read_tensor(infos["big"])
    row = mapped[7]  # a view: the mapping must outlive the tensor it was cut from
    del mapped
    gc.collect()
    assert _maps(shard) == 1 and same_bytes(row, expect[7])
    del row
    gc.collect()
    assert _maps(shard) == 0


def test_pinned_buffers_and_the_switch_turn_mapping_off(monkeypatch):
    assert mapping_reads(BufferPool(pin=False, limit=0))
    assert not mapping_reads(BufferPool(pin=True, limit=0))  # GPU workers alone: async copies from pinned memory
    monkeypatch.setenv("MXCONV_MAPPED_READS", "0")
    assert not mapping_reads(BufferPool(pin=False, limit=0))


def test_copied_tensors_written_with_write2_are_written_from_their_mapping(tiny_sources, tmp_path, monkeypatch):
    """Where the output is written with write(2) (no O_DIRECT, no mapped shard), a copied tensor is
    written from its mapping (one copy of its bytes) instead of read into a buffer and written:
    nothing at all is read into buffers, and the bytes are the same as with reads."""
    import converter.sources.checkpoint as ckpt_module
    from converter.run import writer

    monkeypatch.setenv("MXCONV_MAPPED_WRITES", "0")
    monkeypatch.setattr(writer, "open_direct", lambda path, size: None)
    reads, real_read = [], ckpt_module.read_tensor
    monkeypatch.setattr(ckpt_module, "read_tensor", lambda info, **kw: reads.append(info.name) or real_read(info, **kw))
    converter.convert(tiny_sources["bf16"], tmp_path / "mapped", quiet=True, max_shard_size="300KB", processes=1)
    assert reads == []  # the quantized inputs, and the copied ones too (norms, embeddings, kv_b_proj)
    monkeypatch.setenv("MXCONV_MAPPED_READS", "0")
    converter.convert(tiny_sources["bf16"], tmp_path / "read", quiet=True, max_shard_size="300KB", processes=1)
    assert reads and any("norm" in name for name in reads)
    for path in sorted((tmp_path / "read").glob("*.safetensors")):
        assert (tmp_path / "mapped" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("precision", ["fp8", "bf16", "fp8_ue8m0"])
def test_conversions_with_and_without_mapped_reads_write_the_same_bytes(tiny_sources, tmp_path, monkeypatch,
                                                                       precision):
    calls = []
    import converter.sources.checkpoint as ckpt_module

    real = ckpt_module.map_tensor

    def map_tensor(info):
        tensor = real(info)
        calls.append(tensor is not None)
        return tensor

    monkeypatch.setattr(ckpt_module, "map_tensor", map_tensor)
    # in this process (the spy sees nothing in conversion processes, which 8 cores would start)
    converter.convert(tiny_sources[precision], tmp_path / "mapped", quiet=True, max_shard_size="300KB", processes=1)
    assert any(calls)  # some inputs were mapped, not only asked for
    monkeypatch.setenv("MXCONV_MAPPED_READS", "0")
    calls.clear()
    converter.convert(tiny_sources[precision], tmp_path / "read", quiet=True, max_shard_size="300KB", processes=1)
    assert not calls
    shards = sorted(f.name for f in (tmp_path / "read").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(f.name for f in (tmp_path / "mapped").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "mapped" / name).read_bytes() == (tmp_path / "read" / name).read_bytes(), name


def test_mxconv_commands_that_read_tensors_arrange_the_note(tiny_sources, tmp_path, monkeypatch):
    """`convert` and `unshuffle` install it (they read mapped tensors in their own process); a dry
    run and a Ray driver, which read none, do not."""
    from typer.testing import CliRunner

    from converter.cli import app

    notes = []
    monkeypatch.setattr(native, "note_sigbus", lambda message: notes.append(message) or True)
    monkeypatch.setenv("MXCONV_PROCESSES", "1")
    src = str(tiny_sources["fp8"])
    runner = CliRunner()
    assert runner.invoke(app, ["convert", src, str(tmp_path / "dry"), "--dry-run"]).exit_code == 0
    assert notes == []
    out = tmp_path / "trtllm"
    result = runner.invoke(app, ["convert", src, str(out), "-q", "--recipe", "trtllm"])
    assert result.exit_code == 0, result.output
    assert len(notes) == 1 and "a source file was cut short" in notes[0]
    result = runner.invoke(app, ["unshuffle", str(out), str(tmp_path / "back"), "-q"])
    assert result.exit_code == 0, result.output
    assert len(notes) == 2
