"""A source that changed after (or while part of) a conversion was written (GitHub issue 19).

A rerun must never call DST complete, or keep a finished shard, when a source file it was made
from changed, even by one tensor of the same shape: the file-system identity (inode, mtime,
ctime, size) says "maybe changed" for free, and the sha256 recorded by the earlier run decides
when the bytes may be the same (a touch, a copy of the source elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_reliability import assert_same_tree, leftovers

from converter.files import MANIFEST_FILE, PROVENANCE_FILE, STATE_DIR
from converter.run.pipeline import convert
from converter.run.summary import describe_result

SHARD = "300KB"  # 14 output shards: some are made from a given source file, some are not


@pytest.fixture(scope="module")
def src(tiny_sources):
    return tiny_sources["fp8"]


def copy_source(src: Path, where: Path) -> Path:
    """A real copy (new inodes: edits in place must not reach the shared fixture)."""
    shutil.copytree(src, where)
    return where


def manifest(dst: Path) -> dict:
    return json.loads((dst / STATE_DIR / MANIFEST_FILE).read_text())


def edit_in_place(path: Path, tensor: str) -> None:
    """Change one element of `tensor` in `path` by writing into the file itself: same size,
    same header, same inode; only mtime and ctime move. The element sits in the middle of the
    tensor (the old identity sampled only four 64 KiB windows of the file)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        begin, end = header[tensor]["data_offsets"]
        where = 8 + n + (begin + end) // 2
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([0x38 if old != b"\x38" else 0x30]))  # e4m3 1.0 or 0.5: finite either way


def least_used(dst: Path) -> tuple[str, list[str], list[str]]:
    """The source file the fewest output shards are made from, those shards, and the others."""
    uses = manifest(dst)["shard_sources"]
    files = sorted({f for fs in uses.values() for f in fs})
    name = min(files, key=lambda f: sum(f in fs for fs in uses.values()))
    made = sorted(s for s, fs in uses.items() if name in fs)
    return name, made, sorted(set(uses) - set(made))


def tensor_in(src: Path, file: str) -> str:
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(n for n, f in weight_map.items() if f == file and n.endswith("_proj.weight"))[0]


def stamps(dst: Path, names: list[str]) -> dict[str, int]:
    return {n: (dst / n).stat().st_ino for n in names}


@pytest.fixture()
def converted(src, tmp_path):
    source = copy_source(src, tmp_path / "src")
    dst = tmp_path / "dst"
    convert(source, dst, max_shard_size=SHARD, quiet=True)
    return source, dst


def test_surgical_edit_in_place_redoes_exactly_the_shards_made_from_that_file(converted, tmp_path):
    source, dst = converted
    name, made, others = least_used(dst)
    assert made and others
    kept = stamps(dst, others)
    edit_in_place(source / name, tensor_in(source, name))
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert not result.already_complete
    assert result.skipped_shards == len(others)
    assert stamps(dst, others) == kept  # the other shards were not rewritten
    text = describe_result(result)
    assert f"source file {name} changed (mtime, ctime changed, and its sha256 differs" in text
    assert f"{len(made)} of {len(made) + len(others)} output shard(s) were made from changed source files" in text
    fresh = tmp_path / "fresh"
    convert(source, fresh, max_shard_size=SHARD, quiet=True)
    assert_same_tree(dst, fresh)
    again = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert again.already_complete and not again.source_notes


def test_touched_source_is_confirmed_by_its_sha256_and_kept(converted):
    source, dst = converted
    name = sorted(manifest(dst)["sources"])[1]
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")}
    os.utime(source / name)  # same bytes, new mtime and ctime
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert result.already_complete
    assert result.source_notes == [f"source file {name}: mtime, ctime changed, but its sha256 is the one "
                                   "recorded: unchanged"]
    assert "already complete, nothing to do" in describe_result(result)
    assert "sha256 is the one recorded" in describe_result(result)
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.safetensors")} == before
    # the manifest learned the new identity: the next rerun reads no source byte
    again = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert again.already_complete and not again.source_notes


def test_source_copied_elsewhere_is_accepted_by_its_sha256(converted, tmp_path):
    source, dst = converted
    moved = tmp_path / "elsewhere" / "src"
    shutil.copytree(source, moved)  # new inodes and ctimes (copy2 keeps mtimes)
    result = convert(moved, dst, max_shard_size=SHARD, quiet=True)
    assert result.already_complete
    assert result.source_notes == ["3 source files (model-00001-of-00003.safetensors, ...): ino, ctime changed, "
                                   "but their sha256 are the ones recorded: unchanged"]  # one line, not one per file


def test_sha256_from_mxconv_json_when_the_manifest_has_none(converted):
    """A finished DST written before the manifest kept hashes: mxconv.json's sha256 decides."""
    source, dst = converted
    data = manifest(dst)
    for entry in data["sources"].values():
        entry.pop("sha256")
        entry["stat"]["mtime_ns"] -= 1
    (dst / STATE_DIR / MANIFEST_FILE).write_text(json.dumps(data))
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert result.already_complete and result.source_notes == [
        "3 source files (model-00001-of-00003.safetensors, ...): mtime changed, but their sha256 are the ones "
        "recorded: unchanged"]
    (dst / PROVENANCE_FILE).unlink()  # now nothing recorded a sha256: everything is redone
    data["sources"][sorted(data["sources"])[0]]["stat"]["mtime_ns"] -= 1
    (dst / STATE_DIR / MANIFEST_FILE).write_text(json.dumps(data))
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert not result.already_complete
    assert any("no sha256 was recorded to compare" in n for n in result.source_notes)


def interrupted_run(source: Path, dst: Path, monkeypatch, shards: int) -> None:
    """A conversion that stops after its first `shards` shards (as if interrupted there)."""
    import converter.run.execute

    real = converter.run.execute.execute

    def first_shards_only(todo, *args, **kwargs):
        real(todo[:shards], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.run.execute, "execute", first_shards_only)
    with pytest.raises(KeyboardInterrupt):  # in this process, where `execute` is replaced (not 8+ cores' processes)
        convert(source, dst, max_shard_size=SHARD, quiet=True, processes=1)
    monkeypatch.undo()


def test_resume_across_an_edit_redoes_the_finished_shards_made_from_it(src, tmp_path, monkeypatch):
    source = copy_source(src, tmp_path / "src")
    dst = tmp_path / "dst"
    interrupted_run(source, dst, monkeypatch, shards=9)
    done = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert len(done) == 9 and not (dst / PROVENANCE_FILE).exists()
    uses = manifest(dst)["shard_sources"]
    name = min(sorted(manifest(dst)["sources"]), key=lambda f: sum(f in uses[s] for s in done))
    made = [s for s in done if name in uses[s]]
    others = [s for s in done if s not in made]
    assert made and others
    kept = stamps(dst, others)
    edit_in_place(source / name, tensor_in(source, name))
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)
    assert result.skipped_shards == len(others)
    assert stamps(dst, others) == kept
    assert any(n.startswith(f"source file {name} changed") for n in result.source_notes)
    fresh = tmp_path / "fresh"
    convert(source, fresh, max_shard_size=SHARD, quiet=True)
    assert_same_tree(dst, fresh)
    assert not leftovers(dst)


def test_resume_from_a_copy_keeps_the_shards_whose_sources_were_hashed(src, tmp_path, monkeypatch):
    """An interrupted run records the sha256 of the files hashed so far (made all of them here:
    which are done when the interruption comes is a race), so a resume from a copy of the source
    keeps its shards."""
    from converter.sources.hashing import SourceHasher

    source = copy_source(src, tmp_path / "src")
    dst = tmp_path / "dst"
    real = SourceHasher.finished
    monkeypatch.setattr(SourceHasher, "finished", lambda self: (self.result(), real(self))[1])
    interrupted_run(source, dst, monkeypatch, shards=5)
    assert all("sha256" in e for e in manifest(dst)["sources"].values())
    moved = copy_source(source, tmp_path / "moved")
    result = convert(moved, dst, max_shard_size=SHARD, quiet=True)
    assert result.skipped_shards == 5
    assert all("sha256 is the one recorded: unchanged" in n or "sha256 are the ones recorded: unchanged" in n
               for n in result.source_notes)


def test_source_written_during_the_run_is_refused_at_the_end(src, tmp_path, monkeypatch):
    import converter.run.execute
    from converter.errors import SourceError

    source = copy_source(src, tmp_path / "src")
    dst = tmp_path / "dst"
    real = converter.run.execute.execute
    name = "model-00002-of-00003.safetensors"

    def edit_meanwhile(todo, *args, **kwargs):
        real(todo, *args, **kwargs)
        edit_in_place(source / name, tensor_in(source, name))

    monkeypatch.setattr(converter.run.execute, "execute", edit_meanwhile)
    with pytest.raises(SourceError, match=f"{name}: changed while it was being converted"):
        convert(source, dst, max_shard_size=SHARD, quiet=True, processes=1)  # in this process, as above
    assert not (dst / PROVENANCE_FILE).exists()
    monkeypatch.undo()
    result = convert(source, dst, max_shard_size=SHARD, quiet=True)  # every shard made from it is redone
    assert any(n.startswith(f"source file {name} changed") for n in result.source_notes)
    fresh = tmp_path / "fresh"
    convert(source, fresh, max_shard_size=SHARD, quiet=True)
    assert_same_tree(dst, fresh)


def test_no_source_hash_records_sizes_only_and_a_moved_source_is_redone(src, tmp_path):
    """`--no-source-hash`: the same shards, mxconv.json without sha256 (sizes still there), no
    sha256 in the resume manifest; the rerun from a copy of the source therefore cannot tell its
    files are the same bytes and redoes every shard (the safe side), then the output is the same."""
    from typer.testing import CliRunner

    from converter.cli import app

    dst, hashed = tmp_path / "dst", tmp_path / "hashed"
    done = CliRunner().invoke(app, ["convert", str(src), str(dst), "--max-shard-size", SHARD, "-q", "--no-source-hash"])
    assert done.exit_code == 0, done.output
    shards = json.loads((dst / PROVENANCE_FILE).read_text())["source"]["shards"]
    assert shards and all(v["sha256"] is None and v["bytes"] > 0 for v in shards.values())
    assert not any("sha256" in e for e in manifest(dst)["sources"].values())
    convert(src, hashed, max_shard_size=SHARD, quiet=True)
    assert all(isinstance(v["sha256"], str)
               for v in json.loads((hashed / PROVENANCE_FILE).read_text())["source"]["shards"].values())
    for p in sorted(hashed.glob("*.safetensors")):
        assert (dst / p.name).read_bytes() == p.read_bytes()
    moved = copy_source(src, tmp_path / "moved")
    (dst / PROVENANCE_FILE).unlink()  # "interrupted" at the very end
    result = convert(moved, dst, max_shard_size=SHARD, quiet=True)
    assert result.skipped_shards == 0 and not result.already_complete
