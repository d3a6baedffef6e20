"""Sources downloaded from the Hub: the sha256 that huggingface_hub recorded beside them (the Hub
cache's blob names, a --local-dir download's metadata) is used instead of hashing the files again,
only where huggingface_hub itself would trust it, and a freshness check never relies on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import converter
from converter.files import PROVENANCE_FILE
from converter.sources import hashing
from converter.sources.hub_digests import recorded_sha256


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def as_hub_cache(src: Path, root: Path, xet: bool = False) -> Path:
    """`src` laid out as huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<etag>,
    the etag of the safetensors (LFS) files being their sha256, of small files a 40-digit git id.
    `xet`: as huggingface_hub 2.x stores Xet files, each blob a link on into a shared store
    <cache>/blobs/<2 hex>/<xet hash> (a 64-digit name that is not the file's sha256)."""
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        etag = sha(p) if p.suffix == ".safetensors" else hashlib.sha1(p.read_bytes()).hexdigest()
        if xet:
            xet_hash = hashlib.sha256(b"xet" + p.read_bytes()).hexdigest()
            (root / "blobs" / xet_hash[:2]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, root / "blobs" / xet_hash[:2] / xet_hash)
            (repo / "blobs" / etag).symlink_to(Path("..") / ".." / "blobs" / xet_hash[:2] / xet_hash)
        else:
            shutil.copyfile(p, repo / "blobs" / etag)
        (snapshot / p.name).symlink_to(Path("..") / ".." / "blobs" / etag)
    return snapshot


def as_local_dir(src: Path, root: Path, sub: str = "") -> Path:
    """`src` as `hf download --local-dir root` leaves it: the files, and for each one
    .cache/huggingface/download/<path in the repo>.metadata (commit, etag, time written)."""
    folder = root / sub if sub else root
    shutil.copytree(src, folder)
    for p in sorted(folder.iterdir()):
        meta = root / ".cache" / "huggingface" / "download" / (f"{sub}/{p.name}" if sub else p.name)
        meta = meta.with_name(meta.name + ".metadata")
        meta.parent.mkdir(parents=True, exist_ok=True)
        etag = sha(p) if p.suffix == ".safetensors" else hashlib.sha1(p.read_bytes()).hexdigest()
        meta.write_text(f"{'b' * 40}\n{etag}\n{time.time() + 5}\n")
    return folder


def test_recorded_sha256_where_huggingface_hub_trusts_it(tiny_sources, tmp_path):
    src = tiny_sources["fp8"]
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    for xet in (False, True):
        cache = as_hub_cache(src, tmp_path / f"cache{xet}", xet=xet)
        assert all(recorded_sha256(cache / n) == sha(src / n) for n in shards)
        assert recorded_sha256(cache / "config.json") is None  # a git blob id, not a sha256
        if xet:  # the shared store's names are Xet hashes: never taken for a sha256
            stored = [p for p in (tmp_path / "cacheTrue" / "blobs").rglob("*") if p.is_file()]
            assert stored and all(recorded_sha256(p) is None for p in stored)
    local = as_local_dir(src, tmp_path / "local", sub="weights")
    assert all(recorded_sha256(local / n) == sha(src / n) for n in shards)
    (tmp_path / "linked").symlink_to(local)  # the weights folder reached through a link
    assert all(recorded_sha256(tmp_path / "linked" / n) == sha(src / n) for n in shards)
    assert recorded_sha256(local / "config.json") is None
    assert recorded_sha256(src / shards[0]) is None  # no download record at all
    edited = local / shards[0]
    os.utime(edited, (time.time() + 60, time.time() + 60))  # written after the download: not trusted
    assert recorded_sha256(edited) is None and recorded_sha256(local / shards[1]) == sha(src / shards[1])
    meta = tmp_path / "local" / ".cache" / "huggingface" / "download" / "weights" / f"{shards[1]}.metadata"
    meta.write_text("garbage")
    assert recorded_sha256(local / shards[1]) is None
    link = tmp_path / "elsewhere.safetensors"  # a link that does not lead into a Hub cache
    link.symlink_to(src / shards[0])
    assert recorded_sha256(link) is None


@pytest.mark.parametrize("layout", ["cache", "xet_cache", "local_dir"])
def test_a_hub_download_converts_without_hashing_its_files(tiny_sources, tmp_path, monkeypatch, layout):
    """The conversion hashes none of the downloaded shards (one edited after its download is
    hashed), the provenance holds their true sha256 and says where each came from, and the
    tensors are those of a conversion of the plain copy."""
    src = tiny_sources["fp8"]
    shards = sorted(src.glob("*.safetensors"))
    dl = (as_local_dir(src, tmp_path / "local") if layout == "local_dir"
          else as_hub_cache(src, tmp_path / "cache", xet=layout == "xet_cache"))
    edited = None
    if layout == "local_dir":
        edited = dl / shards[-1].name
        os.utime(edited, (time.time() + 60, time.time() + 60))
    hashed = []
    real = hashing.SourceHasher._begin
    monkeypatch.setattr(hashing.SourceHasher, "_begin", lambda self, path, ahead: hashed.append(path.name)
                        or real(self, path, ahead))
    converter.convert(dl, tmp_path / "out", quiet=True)
    assert hashed == ([edited.name] if edited else [])
    records = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["source"]["shards"]
    for p in shards:
        assert records[p.name]["sha256"] == sha(p)
        assert records[p.name]["sha256_by"] == ("mxconv" if edited and p.name == edited.name
                                                else "huggingface_hub download record")
    converter.convert(src, tmp_path / "plain", quiet=True)
    for p in sorted((tmp_path / "plain").glob("*.safetensors")):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_a_freshness_check_hashes_even_a_recorded_file(tiny_sources, tmp_path):
    """A resume deciding whether a file changed computes its sha256: a download record that was
    written after an edit (so that huggingface_hub would trust it) still does not decide."""
    local = as_local_dir(tiny_sources["fp8"], tmp_path / "local")
    name = sorted(local.glob("*.safetensors"))[0].name
    meta = tmp_path / "local" / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    meta.write_text(f"{'b' * 40}\n{'0' * 64}\n{time.time() + 5}\n")  # a wrong record, trusted by mtime
    assert recorded_sha256(local / name) == "0" * 64
    files = sorted(local.glob("*.safetensors"))
    assert hashing.sha256_files([local / name], files) == {name: sha(local / name)}


def test_a_freshness_check_reuses_the_early_hashes_and_hashes_the_rest_once(tiny_sources, tmp_path, monkeypatch):
    """With an early hasher running (the CLI's), a freshness check takes the files it hashed
    and hashes only the others (a Hub-recorded one among them), each once."""
    local = as_local_dir(tiny_sources["fp8"], tmp_path / "local")
    files = sorted(local.glob("*.safetensors"))
    for p in files[1:]:  # only the first keeps its download record
        (tmp_path / "local" / ".cache" / "huggingface" / "download" / f"{p.name}.metadata").unlink()
    hashed = []
    real = hashing.SourceHasher._begin
    monkeypatch.setattr(hashing.SourceHasher, "_begin", lambda self, path, ahead: hashed.append(path.name)
                        or real(self, path, ahead))
    hashing.start_early(local)
    got = hashing.sha256_files(files, files)
    assert got == {p.name: sha(p) for p in files}
    assert sorted(hashed) == sorted(p.name for p in files)  # each once: the early hasher skipped the first
    hashing.SourceHasher(files).start().result()  # adopt and finish the early hasher
