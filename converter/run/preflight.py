"""Preflight: what can be checked before the long run starts, from config.json, tensor names,
shapes and dtypes and the file system alone, so that a 671B conversion fails in seconds rather
than hours in.

- the source: every indexed file exists and its header parses (done by `SourceCheckpoint.open`),
  the config is a usable config of a supported model family (`check_architecture`), and the
  tensors (in canonical names, after any name mapping) are exactly those the family and config
  imply (families/*.yaml; MTP copies of shared tensors may be absent), with those shapes and
  usable dtypes;
- the destination: not the source, not inside it, not containing it, writable, and its file
  system has room for what is still to be written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from converter.errors import OutputError, SourceError
from converter.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from converter.models.family import Family, family_of
from converter.plan.planner import ConversionPlan
from converter.plan.view import CanonicalTensor, CanonicalView
from converter.run.output import (
    DestinationState,
    check_free_space,
    index_bytes,
    inspect_destination,
    side_files,
)
from converter.sources.checkpoint import SCALE_SUFFIX, SourceCheckpoint, SourceFormat

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
_HIGH_PRECISION = ("BF16", "F16", "F32")
_CONFIG_SLACK = 1 << 20  # config.json and mxconv.json


def expected_tensors(config: dict, have: int, config_file: str | Path = "config.json", family: Family | None = None
                     ) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical name -> (shape, optional) of every tensor a high-precision checkpoint of the
    config's family holds (`check_architecture` has validated the fields). `have` (the
    checkpoint's tensor count) guards against a config that describes a model far larger than
    the files hold."""
    family = family or family_of(config, config_file)
    try:
        layers = config["num_hidden_layers"] + family.n_mtp(config)
        experts = family.n_experts(config)
        estimate = layers * (3 * experts + 25) + 3
        if estimate > 2 * have + 1000:
            raise SourceError(f"config.json describes a model of about {estimate} tensors "
                              f"({config['num_hidden_layers']} layers, {experts} routed experts) but the "
                              f"checkpoint holds {have}: "
                              "config and weights disagree", file=config_file)
        return {name: (shape, optional) for name, (shape, _dtype, optional) in family.tensors(config).items()}
    except SourceError as e:
        raise e.in_file(config_file) from None


def check_source_tensors(ckpt: SourceCheckpoint, view: CanonicalView, fmt: SourceFormat,
                         family: Family | None = None) -> None:
    """Every tensor the config implies is present (core ones at least) with that shape and a
    usable dtype; no tensor is there that the family and config do not have."""
    config, tensors = ckpt.config, view.tensors
    config_file = ckpt.side_root / CONFIG_FILE  # a DCP source's config.json is in its --config directory
    family = family or family_of(config, config_file)
    expected = expected_tensors(config, len(tensors), config_file, family)
    n_layers = config["num_hidden_layers"]
    total_layers = n_layers + family.n_mtp(config)
    present_layers = {int(m[1]) for m in map(_LAYER_RE.match, tensors) if m}
    mtp_present = {layer for layer in range(n_layers, total_layers) if layer in present_layers}
    missing = []
    for name, (shape, optional) in expected.items():
        t = tensors.get(name)
        if t is None:
            if not _optional(name, optional, config, n_layers, total_layers, mtp_present):
                missing.append(name)
            continue
        if t.shape != tuple(shape):
            raise SourceError(f"shape {list(t.shape)} does not match config.json, which implies {list(shape)}",
                              file=t.file, tensor=_label(t))
        if t.dtype not in _HIGH_PRECISION and not (t.dtype == "F8_E4M3" and fmt is not SourceFormat.BF16
                                                  and len(shape) == 2):
            raise SourceError(f"dtype {t.dtype} where a floating-point weight is expected", file=t.file,
                              tensor=_label(t))
    n_experts = family.n_experts(config)
    for name, t in tensors.items():
        if name in expected or name.endswith(SCALE_SUFFIX):
            continue  # scales are checked against their weights by detect_format
        layer = _LAYER_RE.match(name)
        if layer and int(layer[1]) >= total_layers:
            raise SourceError(f"tensor of layer {layer[1]}, but config.json has {n_layers} layers"
                              f" + {total_layers - n_layers} MTP: config and weights disagree",
                              file=t.file, tensor=_label(t))
        expert = _EXPERT_RE.match(name)
        if expert and int(expert[1]) >= n_experts:
            raise SourceError(f"tensor of expert {expert[1]}, but config.json has {family.experts} "
                              f"{n_experts}: config and weights disagree", file=t.file, tensor=_label(t))
        raise SourceError(f"a {family.name} checkpoint with this config.json has no such tensor (extra tensor, or "
                          "config and weights disagree)", file=t.file, tensor=_label(t))
    if missing:
        where = ckpt.root / INDEX_FILE if (ckpt.root / INDEX_FILE).exists() else \
            ckpt.root / SINGLE_FILE if (ckpt.root / SINGLE_FILE).exists() else ckpt.files[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"missing from the checkpoint{more}, though config.json implies it", file=where,
                          tensor=missing[0])


def _optional(name: str, optional: bool, config: dict, n_layers: int, total_layers: int,
              mtp_present: set[int]) -> bool:
    if name == "lm_head.weight" and config.get("tie_word_embeddings"):
        return True
    m = _LAYER_RE.match(name)
    if m and n_layers <= int(m[1]) < total_layers:
        # A checkpoint without its MTP layer still serves the main model; a partial one is broken.
        return int(m[1]) not in mtp_present or optional
    return False


def _label(t: CanonicalTensor) -> str:
    return t.name if t.sources == (t.name,) else f"{t.sources[0]} (as {t.name})"


def check_destination(src_root: str | Path, dst: str | Path) -> None:
    """DST is not SRC (under any path, bind mounts included), not inside it, does not contain
    it, and can be written."""
    src, dst = Path(src_root).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise OutputError(f"destination must not be the source or inside it ({src})", file=dst)
    if dst in src.parents:
        raise OutputError(f"destination must not contain the source ({src})", file=dst)
    src_id = _dir_id(src)
    where = dst
    while not where.exists() and where != where.parent:
        where = where.parent
    for p in (where, *where.parents):
        if _dir_id(p) == src_id:
            raise OutputError(f"destination is inside the source directory (the same directory as {src} "
                              "under another path)", file=dst)
    if where == dst and not dst.is_dir():
        raise OutputError("destination exists and is not a directory", file=dst)
    if where != dst and not where.is_dir():
        raise OutputError(f"cannot create the destination: {where} is not a directory", file=dst)
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputError("destination is not writable" if where == dst
                          else f"cannot create the destination: {where} is not writable", file=dst)


def _dir_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def preflight_destination(src_root: str | Path, dst: str | Path, fingerprint: dict, plan: ConversionPlan,
                          overwrite: bool, src_files: list[Path] | None = None,
                          side_root: str | Path | None = None) -> DestinationState:
    """The destination checks, then what DST already holds, then whether what is left to write
    fits on its disk. Changes nothing (it may read `src_files`, to tell whether they changed).
    `side_root`: where the side files come from (default the source; a DCP source takes them
    from its --config directory)."""
    check_destination(src_root, dst)
    side_root = Path(src_root if side_root is None else side_root)
    state = inspect_destination(Path(dst), fingerprint, plan, overwrite, side_root, src_files)
    if not state.complete:
        todo = [s for s in plan.shards if s.name not in state.done_shards]
        side = sum((side_root / rel).stat().st_size for rel in side_files(side_root))
        needed = sum(s.file_size for s in todo) + len(index_bytes(plan)) + side + _CONFIG_SLACK
        check_free_space(Path(dst), needed, state.reclaimable)
    return state
