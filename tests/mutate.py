"""Small tools that damage a checkpoint on purpose (bad-input and fuzz tests)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def clone(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` whose files are hard links (cheap): replace a file, never
    write into one, or the original changes too (`replace_file` does it right)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_of(root: Path, tensor: str) -> Path:
    return root / json.loads((root / INDEX).read_text())["weight_map"][tensor]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: object, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def edit_header(path: Path, edit) -> None:
    """Rewrite `path` with `edit(header_dict)` applied to its header, data bytes unchanged."""
    header, body = split_safetensors(path.read_bytes())
    edit(header)
    replace_file(path, join_safetensors(header, body))


def edit_tensors(root: Path, edit) -> None:
    """Apply `edit(tensors)` (name -> tensor, mutable) to every shard of checkpoint `root`, and
    rewrite the index to match (tensors may be added, changed or deleted)."""
    index = json.loads((root / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for fname in files:
        tensors = load_file(str(root / fname))
        edit(tensors)
        (root / fname).unlink()  # a hard link: never write through it
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    index["weight_map"] = weight_map
    replace_file(root / INDEX, (json.dumps(index, indent=2) + "\n").encode())


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def put_nan(name: str, row: int = 3, col: int = 40, value: float = float("nan")):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        if name in tensors:
            t = tensors[name].clone()
            t[row, col] = value
            tensors[name] = t
    return edit
