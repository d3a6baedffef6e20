"""Small readers used by several test files: everything a test needs to look at an output
checkpoint through the real safetensors library (not through converter's own reader)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from converter.files import PROVENANCE_FILE


def load_all(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    root = Path(root)
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        for name, t in load_all_from(path).items():
            assert name not in out, f"{name} stored twice"
            out[name] = t
    return out


def load_all_from(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def tensor_files(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(Path(root).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: path.name for name in f.keys()})
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def open_view_failing_once(flag: str, src: str, mapping: str, dst: str, settle: float = 0.0):
    """An opener for conversion processes (it pickles by name) that fails in the first process to
    call it, once another has finished a shard in `dst` (at most a minute) and `settle` seconds
    more have passed, and opens the source in the rest."""
    import os
    import time

    from converter.errors import SourceError
    from converter.run.pipeline import open_view

    try:
        os.rename(flag, flag + ".taken")
    except FileNotFoundError:
        return open_view(src, mapping)
    deadline = time.monotonic() + 60
    while not any(Path(dst).glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(settle)
    raise SourceError("planted failure", file=flag)


def same_conversion(got: Path, want: Path, all_hashed: bool = True) -> None:
    """`got` holds the same conversion as `want`: every file byte-identical, mxconv.json apart
    from its time and options (which say how it ran), the source hashes among what must be equal
    (`all_hashed`: every source file has one; a DCP source records the .metadata's only)."""
    files = sorted(str(p.relative_to(want)) for p in want.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == files
    for name in files:
        if name != PROVENANCE_FILE:
            assert (got / name).read_bytes() == (want / name).read_bytes(), f"{name} differs"
    a, b = (json.loads((d / PROVENANCE_FILE).read_text()) for d in (got, want))
    assert all(v["sha256"] for v in a["source"]["shards"].values()) or not all_hashed
    for key in ("source", "recipe", "output", "complete"):
        assert a[key] == b[key], key
