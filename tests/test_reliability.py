"""Interrupted, resumed and refused conversions (GitHub issue 8).

- `mxconv convert` killed with SIGKILL at random moments, several times, then rerun until it
  finishes, ends byte-identical to an uninterrupted run, and a partial DST never looks complete;
- every state a kill can leave (each output file appears by an atomic rename, so these are the
  prefixes of the write sequence, each with or without the next file's temporary) resumes to
  the same bytes;
- a damaged finished DST is repaired and loses its completion marker while being repaired;
- a changed recipe, source or option is refused (unless --overwrite); DST checks; free space.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from cli_process import MxconvProcess, reference_conversion, run_mxconv
from mutate import clone, edit_tensors, put_nan, replace_file

import converter.run.output
from converter.errors import NonFiniteWarning, OutputError
from converter.files import (
    CONFIG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PROVENANCE_FILE,
    STATE_DIR,
    VERIFY_REPORT_FILE,
)
from converter.hub.push import check_publishable
from converter.run.output import incomplete_reason
from converter.run.pipeline import convert

SHARD = "300KB"  # the tiny checkpoint becomes 14 output shards


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, mxconv.json without its creation time and the manifest without
    the source files' file-system identities (inode, times: the byte-level differences two runs
    of the same conversion may have)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == PROVENANCE_FILE:
                prov = json.loads(data)
                prov.pop("created")
                data = json.dumps(prov, sort_keys=True).encode()
            if p.name == MANIFEST_FILE:
                manifest = json.loads(data)
                for source in manifest["sources"].values():
                    source.pop("stat")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def assert_same_tree(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs"


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.suffix in (".partial", ".tmp")]


def finished_shards(dst: Path) -> int:
    return sum(1 for p in dst.glob("model-*.safetensors"))


@pytest.fixture(scope="module")
def src(tiny_sources):
    return tiny_sources["fp8"]  # FP8 with scales in other shards: dequantize + quantize + copy jobs


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """An uninterrupted run of the command line."""
    return reference_conversion(src, tmp_path_factory.mktemp("reference"), SHARD)


def test_kill_9_at_random_moments_then_resume_is_byte_identical(src, reference, tmp_path):
    rng = random.Random(20260408)
    dst, logs = tmp_path / "dst", tmp_path / "logs"
    planned = finished_shards(reference)
    argv = ["convert", src, dst, "-q", "--max-shard-size", SHARD]
    # kill once this many shards are finished, plus a random delay into whatever comes next;
    # `planned` kills during the side files, index, config or provenance
    targets = sorted(rng.sample(range(planned), 4)) + [planned]
    interrupted, states = [], []
    for target in targets:
        proc = MxconvProcess(argv, logs)
        delay = rng.uniform(0, 0.005)
        deadline = time.monotonic() + 60
        while proc.alive() and time.monotonic() < deadline:
            if (dst / STATE_DIR / MANIFEST_FILE).exists() and finished_shards(dst) >= target:
                time.sleep(delay)
                break
            time.sleep(0.0005)
        if not proc.alive():  # finished before the kill could land (only likely for the last target)
            assert proc.wait().returncode == 0
            break
        proc.kill()
        if not (dst / PROVENANCE_FILE).exists():
            interrupted.append(finished_shards(dst))
            states.append((finished_shards(dst), len(leftovers(dst)), (dst / INDEX_FILE).exists()))
            assert incomplete_reason(dst) is not None
            with pytest.raises(OutputError, match="incomplete conversion"):
                check_publishable(dst, force=False)  # what `mxconv push` checks
    # the partial DST was recognised as incomplete each time, and progress was kept in between
    assert len(interrupted) >= 3, interrupted
    assert len(set(interrupted)) >= 2, interrupted
    print("kills left (finished shards, temporary files, index written):", states)
    if not (dst / PROVENANCE_FILE).exists():  # unless the last run finished before its kill
        result = run_mxconv(argv, logs)  # the same command again
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "resumed" in result.stdout or not finished_shards(dst)
    assert_same_tree(dst, reference)
    assert not leftovers(dst)
    assert incomplete_reason(dst) is None
    # a finished DST: rerunning is a no-op that says so
    stamp = (dst / PROVENANCE_FILE).stat().st_mtime_ns
    again = run_mxconv(argv, logs)
    assert again.returncode == 0 and "already complete, nothing to do" in again.stdout
    assert (dst / PROVENANCE_FILE).stat().st_mtime_ns == stamp


def write_sequence(reference: Path) -> list[str]:
    """The files of a conversion in the order `convert` makes them (workers=1)."""
    shards = sorted(p.name for p in reference.glob("model-*.safetensors"))
    side = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file()
                  and p.name not in (INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE) and STATE_DIR not in p.parts
                  and not p.name.endswith(".safetensors"))
    return [f"{STATE_DIR}/{MANIFEST_FILE}", *shards, *side, INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE]


def temporary_of(name: str) -> str:
    if name.endswith(".safetensors"):
        return f"{STATE_DIR}/{name}.partial"
    return f"{STATE_DIR}/.{Path(name).name}.tmp"


@pytest.fixture(scope="module")
def small_reference(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("small-reference") / "dst"
    convert(src, dst, max_shard_size="1MB", quiet=True)
    return dst


def test_every_crash_point_resumes_byte_identical(src, small_reference, tmp_path):
    sequence = write_sequence(small_reference)
    assert len(sequence) >= 8
    for i in range(1, len(sequence)):  # a kill after the first i files, with the next one half-written
        dst = tmp_path / f"crash-{i}"
        for name in sequence[:i]:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(small_reference / name, dst / name)
        (dst / temporary_of(sequence[i])).write_bytes(b"\0" * 1000)
        assert incomplete_reason(dst) is not None
        result = convert(src, dst, max_shard_size="1MB", quiet=True)
        assert not result.already_complete
        assert result.skipped_shards == sum(name.endswith(".safetensors") for name in sequence[:i])
        assert_same_tree(dst, small_reference)
        assert not leftovers(dst)


def test_killed_before_the_manifest_was_written(src, small_reference, tmp_path):
    dst = tmp_path / "dst"
    (dst / STATE_DIR).mkdir(parents=True)
    (dst / STATE_DIR / f".{MANIFEST_FILE}.tmp").write_bytes(b'{"half')
    convert(src, dst, max_shard_size="1MB", quiet=True)
    assert_same_tree(dst, small_reference)


def test_finished_destination_is_a_no_op(src, small_reference, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(small_reference, dst)
    before = tree(dst)
    result = convert(src, dst, max_shard_size="1MB", quiet=True)
    assert result.already_complete
    result = convert(src, dst, max_shard_size="1MB", quiet=True, overwrite=True, workers=2)
    assert result.already_complete  # same conversion: --overwrite has nothing to replace
    assert tree(dst) == before


def test_damaged_finished_destination_is_unmarked_then_repaired(src, small_reference, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    shutil.copytree(small_reference, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    shards[1].unlink()
    data = bytearray(shards[0].read_bytes())
    data[20] ^= 0x01  # same size, different header: not a shard of this plan
    shards[0].write_bytes(bytes(data))
    (dst / VERIFY_REPORT_FILE).write_text('{"passed": true}')  # from `mxconv verify` before the damage

    import converter.run.execute

    def crash(*args, **kwargs):
        raise OutputError("simulated crash during the repair")

    monkeypatch.setattr(converter.run.execute, "execute", crash)
    with pytest.raises(OutputError, match="simulated"):  # in this process, where `execute` is replaced
        convert(src, dst, max_shard_size="1MB", quiet=True, processes=1)
    # while being repaired the DST does not look complete
    assert not (dst / PROVENANCE_FILE).exists() and not (dst / INDEX_FILE).exists()
    assert not (dst / CONFIG_FILE).exists() and not (dst / VERIFY_REPORT_FILE).exists()
    assert incomplete_reason(dst) is not None
    monkeypatch.undo()
    result = convert(src, dst, max_shard_size="1MB", quiet=True)
    assert result.skipped_shards == len(shards) - 2
    assert result.source_notes == [f"output shard(s) {shards[0].name} not as planned (truncated or changed since "
                                   "written): redone"]  # the deleted one is simply written
    assert_same_tree(dst, small_reference)


def test_deleted_side_file_is_restored(src, small_reference, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(small_reference, dst)
    (dst / "tokenizer_config.json").unlink()
    result = convert(src, dst, max_shard_size="1MB", quiet=True)
    assert not result.already_complete and result.skipped_shards == len(list(dst.glob("model-*")))
    assert_same_tree(dst, small_reference)


def test_side_files_skip_weights_and_pickle_indexes(src, tmp_path):
    copy = clone(src, tmp_path / "src")
    (copy / "pytorch_model.bin.index.json").write_text("{}")
    (copy / "tokenizer.json").write_text("{}")
    (copy / "sub").mkdir()
    (copy / "sub" / "chat_template.jinja").write_text("x")
    result = convert(copy, tmp_path / "dst", quiet=True)
    assert sorted(result.copied_files) == ["LICENSE", "generation_config.json", "sub/chat_template.jinja",
                                           "tokenizer.json", "tokenizer_config.json"]


def partial_run(src: Path, dst: Path, monkeypatch, **kwargs) -> None:
    """A conversion that stops after its first shard (as if killed there)."""
    import converter.run.execute

    real = converter.run.execute.execute

    def first_shard_only(todo, *args, **kwargs):
        real(todo[:1], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.run.execute, "execute", first_shard_only)
    with pytest.raises(KeyboardInterrupt):  # in this process, where `execute` is replaced
        convert(src, dst, quiet=True, processes=1, **kwargs)
    monkeypatch.undo()


@pytest.mark.parametrize("change, what", [
    ({"max_shard_size": "2MB"}, r"\(changed: the output layout \(which tensor goes in which shard\), the shard sizes "
                                r"\(--max-shard-size\)\)"),
    ({"scale_rule": "floor"}, r"\(changed: recipe\)"),
    ({"recipe": "deepseek_v3_mxfp8_trtllm"}, "recipe"),
])
def test_changed_option_or_recipe_is_refused(src, tmp_path, monkeypatch, change, what):
    """Said in a user's words: which of the things the output depends on differ."""
    dst = tmp_path / "dst"
    partial_run(src, dst, monkeypatch, max_shard_size="1MB")
    options = {"max_shard_size": "1MB", **change}
    with pytest.raises(OutputError, match=f"an unfinished conversion made otherwise .*{what}.*resume it"):
        convert(src, dst, quiet=True, **options)
    assert (dst / STATE_DIR / MANIFEST_FILE).exists()  # refused: nothing touched
    result = convert(src, dst, quiet=True, overwrite=True, **options)
    assert result.skipped_shards == 0 and (dst / PROVENANCE_FILE).exists()


def test_changed_source_config_is_refused(src, small_reference, tmp_path):
    copy = clone(src, tmp_path / "src")
    dst = tmp_path / "dst"
    shutil.copytree(small_reference, dst)
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 50000.0  # changes the output config.json, not a single shard
    replace_file(copy / "config.json", json.dumps(config).encode())
    with pytest.raises(OutputError, match=r"changed: the source.s config.json\)"):
        convert(copy, dst, max_shard_size="1MB", quiet=True)


def test_overwrite_of_an_interrupted_same_conversion_resumes(src, small_reference, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    partial_run(src, dst, monkeypatch, max_shard_size="1MB")
    result = convert(src, dst, max_shard_size="1MB", quiet=True, overwrite=True)
    assert result.skipped_shards == 1
    assert_same_tree(dst, small_reference)


def test_second_process_on_the_same_destination_is_refused(src, tmp_path, monkeypatch):
    """E.g. a scheduler re-queues a job that is still running: two writers of the same partial
    files could leave a shard with the right size and header but half-written data."""
    import fcntl
    import os

    dst = tmp_path / "dst"
    partial_run(src, dst, monkeypatch, max_shard_size="1MB")
    converter.run.output.unlock(dst)  # the interrupted run's lock, as if its process had ended
    other = os.open(dst / STATE_DIR / "lock", os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(other, b"4242\n", 0)
    try:
        with pytest.raises(OutputError, match=r"another mxconv process \(pid 4242\) is writing this destination"):
            convert(src, dst, max_shard_size="1MB", quiet=True)
    finally:
        os.close(other)
    result = convert(src, dst, max_shard_size="1MB", quiet=True)  # the lock is free again: resumes
    assert result.skipped_shards == 1


def test_destination_not_written_by_mxconv_is_refused(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by mxconv"):
            convert(src, dst, quiet=True, overwrite=overwrite)
        assert (dst / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink", "file"])
def test_destination_checks(src, tmp_path, where):
    copy = clone(src, tmp_path / "a" / "src")
    dst = {"same": copy, "inside": copy / "out", "contains": tmp_path / "a", "symlink": tmp_path / "link" / "out",
           "file": tmp_path / "file"}[where]
    if where == "symlink":
        (tmp_path / "link").symlink_to(copy)
    if where == "file":
        dst.write_text("x")
    with pytest.raises(OutputError, match="must not|not a directory"):
        convert(copy, dst, quiet=True, overwrite=True)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in src.iterdir())


def test_not_enough_free_space_names_both_numbers_before_any_work(src, tmp_path, monkeypatch):
    import converter.run.output

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(converter.run.output.shutil, "disk_usage", lambda p: usage._replace(free=1_000_000))
    dst = tmp_path / "out" / "dst"
    with pytest.raises(OutputError, match=r"needs \d+\.\d+ MB more, 1\.00 MB are free"):
        convert(src, dst, quiet=True)
    assert not dst.exists() and not dst.parent.exists()  # checked before anything was created


def test_nan_error_leaves_a_clean_destination(src, tmp_path):
    """A run that fails mid-way (NaN found in the fourth shard) leaves no temporary files and no
    marker; --allow-nonfinite changes the recipe, so it needs --overwrite, and then completes
    with a warning."""
    copy = clone(src, tmp_path / "src")
    edit_tensors(copy, put_nan("model.layers.2.mlp.experts.3.up_proj.weight"))
    dst = tmp_path / "dst"
    from converter.errors import NumericsError

    with pytest.raises(NumericsError, match="up_proj"):
        convert(copy, dst, quiet=True, max_shard_size=SHARD)
    assert not leftovers(dst) and not (dst / PROVENANCE_FILE).exists()
    with pytest.warns(NonFiniteWarning, match="up_proj.weight: 1 block"):
        convert(copy, dst, quiet=True, max_shard_size=SHARD, allow_nonfinite=True, overwrite=True)
    assert (dst / PROVENANCE_FILE).exists()
