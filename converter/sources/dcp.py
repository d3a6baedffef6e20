"""PyTorch Distributed Checkpoint (DCP) sources: Megatron-core `torch_dist` and FSDP2 checkpoints.

`DcpCheckpoint.open` reads `.metadata` (restricted unpickler), keeps the model weights (not
optimizer state, RNG state, `_extra_state` or other bytes items, whose bytes are never read),
strips a wrapper prefix (`model_state.model.`, `dcp.model.`, `model.`), checks that every
weight's chunks tile it exactly and lie inside their files, and takes `config.json` and the side
files from the Hugging Face directory given with `--config`. The Hugging Face DCP variant
(per-rank safetensors whose `DCP_SHARDING_INFO` metadata gives each chunk's offsets) is read the
same way, each safetensors entry being one raw chunk.

Each tensor is a `DcpTensor`: a `TensorInfo` whose [start, end) is a byte range of the global
tensor flattened row-major, so the planner and the row pieces of `converter.run.pieces` work on
it unchanged; reading it assembles exactly that range from the overlapping chunks. `canonical`
turns the name mapping's renames and row slices (split along dim 0, one expert of stacked
experts, a vocabulary trimmed of its padding) into such ranges, so nothing is ever materialized
whole.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter.errors import MappingError, SourceError
from converter.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from converter.sources.checkpoint import SourceCheckpoint, _read_json
from converter.sources.dcp_chunks import Chunk, ChunkReader, flat_boxes
from converter.sources.safetensors import DTYPE_CODES, ITEMSIZE, TensorInfo, read_header, target_buffer
from converter.sources.unpickle import Record, load_metadata

METADATA_FILE = ".metadata"
SHARDING_KEY = "DCP_SHARDING_INFO"  # Hugging Face DCP safetensors: {fqn: {"saved_offsets": [...]}}
WRAPPER_PREFIXES = ("model_state.model.", "dcp.model.", "model.")
# Not model weights: never read (bytes items are skipped whatever their name).
_SKIP = re.compile(r"^(optimizer\.|rng_state|common_state|rerun_state_machine)|_extra_state|(^|\.)optim(izer)?_state")


def is_dcp(path: str | Path) -> bool:
    """A PyTorch DCP checkpoint: `.metadata` and .distcp files, or the Hugging Face variant
    (safetensors files with DCP_SHARDING_INFO and no index)."""
    return (Path(path) / METADATA_FILE).is_file() or bool(hf_dcp_files(Path(path)))


def hf_dcp_files(root: Path) -> list[Path]:
    """The safetensors files of a Hugging Face DCP checkpoint saved distributed (each rank its
    own chunks, no index), or [] when `root` is not one."""
    if not root.is_dir() or (root / INDEX_FILE).exists() or (root / SINGLE_FILE).exists():
        return []
    files = sorted(root.glob("*.safetensors")) or sorted((root / "sharded").glob("*.safetensors"))
    try:
        return files if files and SHARDING_KEY in read_header(files[0])[1] else []
    except SourceError:
        return []


@dataclass(frozen=True)
class DcpTensor(TensorInfo):
    """Bytes [start, end) of the global tensor `fqn` (shape `global_shape`), flattened row-major."""

    fqn: str = ""
    global_shape: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    reader: ChunkReader | None = field(default=None, compare=False, repr=False)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(sorted({c.file for c in self.chunks})) or (self.file,)

    def read(self, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        buf = target_buffer(self.nbytes, pin, out)
        size = ITEMSIZE[self.dtype]
        flat = buf.view(self.torch_dtype)
        fds: dict[Path, int] = {}
        try:
            for at, lo, hi in flat_boxes(self.global_shape, self.start // size, self.end // size):
                box = flat[at:at + math.prod(b - a for a, b in zip(lo, hi))].view([b - a for a, b in zip(lo, hi)])
                for chunk in self.chunks:
                    clo = [max(a, o) for a, o in zip(lo, chunk.offsets)]
                    chi = [min(b, o + s) for b, o, s in zip(hi, chunk.offsets, chunk.sizes)]
                    if any(a >= b for a, b in zip(clo, chi)) and lo:
                        continue
                    fd = fds.get(chunk.file)
                    if fd is None:
                        try:
                            fd = fds[chunk.file] = os.open(chunk.file, os.O_RDONLY)
                        except OSError as e:
                            raise SourceError(f"cannot open: {e.strerror}", file=chunk.file, tensor=self.fqn) from e
                    dest = box[tuple(slice(a - l0, b - l0) for a, b, l0 in zip(clo, chi, lo))]
                    self.reader.copy_box(fd, chunk, self.torch_dtype, self.fqn, tuple(clo), tuple(chi), dest, buf)
        finally:
            for fd in fds.values():
                os.close(fd)
        return flat.view(self.shape)


@dataclass
class DcpCheckpoint(SourceCheckpoint):
    """A DCP directory read as a source checkpoint (see the module docstring)."""

    config_root: Path = Path(".")
    prefix: str = ""

    @classmethod
    def open(cls, root: str | Path, config_root: str | Path | None = None) -> "DcpCheckpoint":
        root = Path(root)
        if config_root is None and (root / CONFIG_FILE).is_file():
            config_root = root
        config_root = Path(config_root) if config_root is not None else None
        if config_root is None:
            raise SourceError("a PyTorch DCP checkpoint carries no Hugging Face config.json: pass --config "
                              "HF_DIR (the model the run started from)", file=root)
        config_path = config_root / CONFIG_FILE
        if not config_path.is_file():
            raise SourceError("no config.json in the --config directory", file=config_path)
        config = _read_json(config_path)
        config.pop("quantization_config", None)  # training checkpoints hold high-precision weights
        reader = ChunkReader()
        if not (root / METADATA_FILE).is_file():
            tensors, meta_path = _hf_tensors(root, reader), None
        else:
            tensors, meta_path = _pickled_tensors(root, reader), root / METADATA_FILE
        prefix = _wrapper_prefix(list(tensors))
        tensors = {n[len(prefix):]: dataclasses.replace(t, name=n[len(prefix):]) for n, t in tensors.items()}
        files = ([meta_path] if meta_path else []) + sorted({c.file for t in tensors.values() for c in t.chunks})
        return cls(root, config, tensors, files, {}, config_root=config_root, prefix=prefix)

    @property
    def side_root(self) -> Path:
        return self.config_root

    @property
    def hashed_files(self) -> list[Path]:
        """The .metadata only: the .distcp files also hold optimizer state (often twice the weights).
        (Hugging Face DCP safetensors hold weights only: all of them.)"""
        return self.files[:1] if self.files[0].name == METADATA_FILE else self.files

    def canonical(self, derivations: dict) -> "DcpCheckpoint":
        """This checkpoint under canonical names: each mapped tensor a byte range of a source tensor."""
        out, index = {}, {}
        for target, d in derivations.items():
            src = self.tensors[d.sources[0]]
            shape = src.shape
            rows_total = shape[0] if len(shape) > 1 else 1
            row_bytes = src.nbytes // max(rows_total, 1)
            if d.op == "rename":
                r0, r1, new = 0, rows_total, shape
            elif d.op == "split" and d.dim == 0:
                n = shape[0] // d.parts
                r0, r1, new = d.index * n, (d.index + 1) * n, (n, *shape[1:])
            elif d.op == "slice":
                flat_rows = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
                row_bytes = src.nbytes // max(flat_rows, 1)
                r0, r1 = d.rows
                new = (r1 - r0, shape[-1]) if len(shape) > 1 else (r1 - r0,)
            else:
                raise MappingError(f"a {d.op} along dim {d.dim} is not a row range; DCP sources support "
                                   "renames and row slices only", tensor=target)
            start, end = src.start + r0 * row_bytes, src.start + r1 * row_bytes
            chunks = _overlapping(src, start, end, index)
            out[target] = dataclasses.replace(src, name=target, shape=tuple(new), start=start, end=end,
                                              chunks=chunks, file=chunks[0].file if chunks else src.file)
        return dataclasses.replace(self, tensors=out)


def _pickled_tensors(root: Path, reader: ChunkReader) -> dict[str, DcpTensor]:
    """The weights of a `.metadata` + .distcp checkpoint."""
    meta_path = root / METADATA_FILE
    md = load_metadata(meta_path)
    state, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if not isinstance(state, dict) or not isinstance(storage, dict):
        raise SourceError("Metadata lacks state_dict_metadata or storage_data", file=meta_path)
    places = {}
    for key, info in storage.items():
        fqn, offset = getattr(key, "fqn", None), getattr(key, "offset", None)
        if isinstance(fqn, str) and isinstance(offset, tuple):
            places[(fqn, offset)] = info
    sizes: dict[str, tuple[Path, int]] = {}
    tensors: dict[str, DcpTensor] = {}
    for fqn, entry in state.items():
        if not isinstance(fqn, str) or _SKIP.search(fqn) or getattr(entry, "kind", "") != "TensorStorageMetadata":
            continue
        tensors[fqn] = _tensor(root, meta_path, fqn, entry, places, sizes, reader)
    if not tensors:
        raise SourceError("the DCP checkpoint holds no model weights", file=meta_path)
    return tensors


def _hf_tensors(root: Path, reader: ChunkReader) -> dict[str, DcpTensor]:
    """The weights of a Hugging Face DCP checkpoint: each safetensors entry is a chunk at its
    DCP_SHARDING_INFO `saved_offsets`; the global shape is where the chunks end."""
    import json

    chunks: dict[str, list[Chunk]] = {}
    dtypes: dict[str, str] = {}
    for path in hf_dcp_files(root):
        infos, meta = read_header(path)
        try:
            sharding = json.loads(meta.get(SHARDING_KEY, "{}"))
        except ValueError as e:
            raise SourceError(f"{SHARDING_KEY} is not valid JSON: {e}", file=path) from None
        for name, info in infos.items():
            offsets = (sharding.get(name) or {}).get("saved_offsets") if isinstance(sharding, dict) else None
            if not isinstance(offsets, list) or len(offsets) != len(info.shape) or \
                    not all(isinstance(o, int) and o >= 0 for o in offsets):
                raise SourceError(f"no usable saved_offsets in {SHARDING_KEY}", file=path, tensor=name)
            if dtypes.setdefault(name, info.dtype) != info.dtype:
                raise SourceError(f"chunk is {info.dtype}, another chunk {dtypes[name]}", file=path, tensor=name)
            chunks.setdefault(name, []).append(Chunk(tuple(offsets), info.shape, path, info.start, info.nbytes,
                                                     raw=True))
    tensors = {}
    for name, cs in chunks.items():
        if _SKIP.search(name):
            continue
        shape = tuple(max(c.offsets[k] + c.sizes[k] for c in cs) for k in range(len(cs[0].sizes)))
        _check_tiling(cs[0].file, name, shape, cs)
        nbytes = math.prod(shape) * ITEMSIZE[dtypes[name]]
        tensors[name] = DcpTensor(name, cs[0].file, dtypes[name], shape, 0, nbytes, name, shape, tuple(cs), reader)
    if not tensors:
        raise SourceError("the DCP checkpoint holds no model weights", file=root)
    return tensors


def _overlapping(t: DcpTensor, start: int, end: int, index: dict) -> tuple[Chunk, ...]:
    """The chunks of `t` that can hold bytes [start, end) (by their range along dim 0), so reading
    one expert of a stacked tensor does not look at every other expert's chunks. `index` caches
    each tensor's chunks sorted along dim 0 (256 experts x 3 slices each would otherwise scan
    every chunk of the tensor for every slice)."""
    if not t.global_shape or end <= start:
        return t.chunks
    per = t.nbytes // max(t.global_shape[0], 1)  # bytes per index of dim 0
    if not per:
        return t.chunks
    if t.fqn not in index:
        ordered = sorted(t.chunks, key=lambda c: c.offsets[0])
        index[t.fqn] = ([c.offsets[0] for c in ordered], ordered, max((c.sizes[0] for c in ordered), default=0))
    offsets, ordered, longest = index[t.fqn]
    first, last = start // per, (end - 1) // per
    lo, hi = bisect.bisect_left(offsets, first - longest + 1), bisect.bisect_right(offsets, last)
    return tuple(c for c in ordered[lo:hi] if c.offsets[0] + c.sizes[0] > first)


def _tensor(root: Path, meta_path: Path, fqn: str, entry: Record, places: dict, sizes: dict,
            reader: ChunkReader) -> DcpTensor:
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    shape = getattr(entry, "size", None)
    if dtype not in DTYPE_CODES:
        raise SourceError(f"unsupported dtype {dtype}", file=meta_path, tensor=fqn)
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SourceError(f"bad size {shape!r}", file=meta_path, tensor=fqn)
    code = DTYPE_CODES[dtype]
    chunks = []
    for c in getattr(entry, "chunks", None) or []:
        offsets, csizes = getattr(c, "offsets", None), getattr(c, "sizes", None)
        if not (isinstance(offsets, tuple) and isinstance(csizes, tuple) and len(offsets) == len(csizes) == len(shape)
                and all(0 <= o and 0 <= s and o + s <= d for o, s, d in zip(offsets, csizes, shape))):
            raise SourceError(f"chunk at {offsets} of size {csizes} does not fit the tensor's shape {list(shape)}",
                              file=meta_path, tensor=fqn)
        info = places.get((fqn, offsets))
        if info is None:
            raise SourceError(f"chunk at {list(offsets)} has no storage entry", file=meta_path, tensor=fqn)
        rel, off, length = getattr(info, "relative_path", None), getattr(info, "offset", None), \
            getattr(info, "length", None)
        if getattr(info, "transform_descriptors", None):
            raise SourceError(f"chunk at {list(offsets)} is stored transformed ({info.transform_descriptors}); "
                              "mxconv reads untransformed records only", file=root / str(rel), tensor=fqn)
        if not isinstance(rel, str) or rel not in sizes and (
                not rel or "\x00" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts):
            raise SourceError(f"chunk at {list(offsets)} names an unusable file {rel!r}", file=meta_path, tensor=fqn)
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length <= 0:
            raise SourceError(f"chunk at {list(offsets)} has a bad record {off!r}+{length!r}", file=root / rel,
                              tensor=fqn)
        if rel not in sizes:  # by name: one Path and one stat per file, not per chunk
            path = root / rel
            try:
                sizes[rel] = path, path.stat().st_size
            except OSError as e:
                raise SourceError(f"data file is missing or unreadable ({e.strerror})", file=path, tensor=fqn) from e
        path, size = sizes[rel]
        if off + length > size:
            raise SourceError(f"chunk at {list(offsets)} ends at byte {off + length} but the file has {size} "
                              "(truncated .distcp)", file=path, tensor=fqn)
        chunks.append(Chunk(offsets, csizes, path, off, length))
    _check_tiling(meta_path, fqn, shape, chunks)
    nbytes = math.prod(shape) * ITEMSIZE[code]
    return DcpTensor(fqn, chunks[0].file if chunks else meta_path, code, shape, 0, nbytes, fqn, shape, tuple(chunks),
                     reader)


def _check_tiling(meta_path: Path, fqn: str, shape: tuple, chunks: list[Chunk]) -> None:
    """Every element of the tensor is in exactly one chunk (on the grid of all chunk edges)."""
    if not shape:
        if len(chunks) != 1:
            raise SourceError(f"scalar saved in {len(chunks)} chunks", file=meta_path, tensor=fqn)
        return
    edges = [sorted({0, d} | {c.offsets[k] for c in chunks} | {c.offsets[k] + c.sizes[k] for c in chunks})
             for k, d in enumerate(shape)]
    index = [{e: i for i, e in enumerate(es)} for es in edges]
    counts = torch.zeros([max(len(es) - 1, 1) for es in edges], dtype=torch.int32)
    for c in chunks:
        counts[tuple(slice(index[k][o], index[k][o + s]) for k, (o, s) in enumerate(zip(c.offsets, c.sizes)))] += 1
    cells = [torch.tensor([b - a for a, b in zip(es, es[1:])] or [0]) for es in edges]
    empty = torch.zeros_like(counts, dtype=torch.bool)
    for k, widths in enumerate(cells):
        shape_k = [1] * len(edges)
        shape_k[k] = -1
        empty |= (widths == 0).view(shape_k)
    if bool(((counts > 1) & ~empty).any()):
        raise SourceError("chunks overlap (the same elements saved twice)", file=meta_path, tensor=fqn)
    if bool(((counts == 0) & ~empty).any()):
        cell = ((counts == 0) & ~empty).nonzero()[0].tolist()
        where = [edges[k][i] for k, i in enumerate(cell)]
        raise SourceError(f"chunks leave elements unsaved (first missing at {where})", file=meta_path, tensor=fqn)


def _wrapper_prefix(names: list[str]) -> str:
    """The FSDP/trainer wrapper prefix all weight names share, if any (Hugging Face names keep
    their own `model.`: `model.model.layers.0...` loses one, `model.layers.0...` none)."""
    for prefix in WRAPPER_PREFIXES:
        if all(n.startswith(prefix) for n in names):
            rest = [n[len(prefix):] for n in names]
            if prefix == "model." and not any(r.startswith(("model.", "lm_head.")) for r in rest):
                continue
            return prefix
    return ""
