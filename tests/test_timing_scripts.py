"""The scripts that time a run from outside (timeline.py, profile_pipeline.py) still run: they patch
the pipeline and the hasher, so a rename there breaks them without breaking anything else. And
hash_probe.py, which feeds the hasher's compiled rounds its own ways, gives the hasher's digests."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import same_conversion

from converter.run.pipeline import convert
from converter.sources import sha256_pairs
from converter.sources.hashing import SourceHasher

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "timeline.py"


def test_timeline_sees_every_process_and_every_file_hashed(tiny_sources, tmp_path):
    src = tiny_sources["bf16"]
    env = {**os.environ, "MXCONV_PROCESSES": "2"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(src), str(tmp_path / "out"), "--workers", "8",
                           "--max-shard-size", "1MB", "--json", str(tmp_path / "t.jsonl"), "--label", "t", "--keep"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1])
    assert run["label"] == "t" and run["hash"] is True
    assert run["hashed_files"] >= len(list(Path(src).glob("*.safetensors"))) >= 3
    first, last = run["hash_s"]
    assert first <= last
    assert len(run["processes"]) == 2
    assert all(p["done_s"] is not None and p["bytes"] > 0 for p in run["processes"].values())
    assert round(sum(p["bytes"] for p in run["processes"].values()) / 1e9, 3) == run["input_gb"]
    # what it patches only watches: the output is the conversion's own, byte for byte
    same_conversion(tmp_path / "out", convert(src, tmp_path / "plain", max_shard_size="1MB", quiet=True).dst)


def test_profile_pipeline_times_every_stage(tiny_sources, tmp_path):
    """scripts/profile_pipeline.py (one process's stages, the same kind of outside patching)."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "profile_pipeline.py"), str(tiny_sources["fp8"]),
                           str(tmp_path / "out"), "--workers", "2", "--json", str(tmp_path / "p.jsonl"), "--keep"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[-1])
    assert run["workers"] == 2 and run["input_gb"] > 0
    assert run["calls"]["compute"] > 0 and run["calls"]["write"] > 0
    assert {"readers", "workers", "writers"} <= set(run["groups"])
    same_conversion(tmp_path / "out", convert(tiny_sources["fp8"], tmp_path / "plain", quiet=True).dst)


def test_hash_probe_gets_the_hashers_digests_every_way(tmp_path):
    """scripts/hash_probe.py: each way of feeding a chain gives the hasher's digests (and
    hashlib's), files of every length class included: empty, under a block, windows and a tail."""
    if sha256_pairs.compressor() is None:
        pytest.skip("no compiled sha256 rounds here (no compiler or no SHA-NI)")
    sizes = [0, 5, 64, (1 << 20) + 63, (17 << 20) + 4097]
    data = {f"f{i}.safetensors": os.urandom(n) for i, n in enumerate(sizes)}
    for name, blob in data.items():
        (tmp_path / name).write_bytes(blob)
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "hash_probe.py"), str(tmp_path), "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("5 files") and len(lines) == 12  # the count line and 11 ways
    got = SourceHasher(sorted(tmp_path.glob("*.safetensors")), use_recorded=False)._launch().result()
    assert got == {name: hashlib.sha256(blob).hexdigest() for name, blob in data.items()}
