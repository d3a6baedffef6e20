"""Reading a source checkpoint: index, headers and config up front; tensor data on demand.

`SourceCheckpoint` knows where every source tensor lives. `SourceFormat` says what precision the
checkpoint is in and is checked against the tensors themselves, not only the config.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.errors import SourceError
from converter.models.family import Family
from converter.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from converter.numerics.reference import fp8_block_scale_shape
from converter.sources.safetensors import TensorInfo, read_header
from converter.sources.safetensors import map_tensor as _map_safetensors
from converter.sources.safetensors import read_tensor as _read_safetensors

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SourceFormat(str, enum.Enum):
    BF16 = "bf16"  # also FP16/FP32: anything without block-quantized weights
    FP8 = "fp8"  # DeepSeek V3/R1 release: e4m3 + float32 128x128 scale_inv
    FP8_UE8M0 = "fp8_ue8m0"  # V3.1 style: the same with power-of-two scales


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


@dataclass
class SourceCheckpoint:
    root: Path
    config: dict
    tensors: dict[str, TensorInfo]
    files: list[Path]
    metadata: dict
    family: Family | None = None  # set by check_architecture

    @classmethod
    def open(cls, root: str | Path) -> "SourceCheckpoint":
        root = Path(root)
        if not root.is_dir():
            raise SourceError("source does not exist" if not Path(root).exists() else "source is not a directory",
                              file=root)
        config_path = root / CONFIG_FILE
        config = _read_json(config_path) if config_path.exists() else None
        if config is None:
            raise SourceError("no config.json in the source checkpoint", file=config_path)
        index_path = root / INDEX_FILE
        if index_path.exists():
            index = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError("index has no weight_map", file=index_path)
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or not fname:
                    raise SourceError(f"index maps the tensor to {fname!r}, not a file name", file=index_path,
                                      tensor=name)
            files = sorted(set(weight_map.values()))
            metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        elif (root / SINGLE_FILE).exists():
            weight_map, files, metadata = None, [SINGLE_FILE], {}
        else:
            try:
                pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            except OSError as e:
                raise SourceError(f"cannot list: {e.strerror}", file=root) from e
            if pickles:
                raise SourceError(f"only pickle weights found ({pickles[0]}, ...); mxconv never unpickles "
                                  "untrusted files: convert them to safetensors first", file=root)
            raise SourceError(f"no {INDEX_FILE} or {SINGLE_FILE}", file=root)
        tensors: dict[str, TensorInfo] = {}
        paths = []
        for fname in files:
            path = _weight_file(root, fname, index_path)
            infos, _ = read_header(path)
            for name, info in infos.items():
                if name in tensors:
                    raise SourceError(f"tensor also stored in {tensors[name].file.name}", file=path, tensor=name)
                tensors[name] = info
            paths.append(path)
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = tensors.get(name)
                if info is None or info.file != root / fname:
                    raise SourceError(f"index maps it to {fname} but that file does not hold it",
                                      file=root / fname, tensor=name)
            extra = sorted(set(tensors) - set(weight_map))
            if extra:
                raise SourceError("tensor is in a shard but not in the index", file=tensors[extra[0]].file,
                                  tensor=extra[0])
        if not tensors:
            raise SourceError("the checkpoint holds no tensors", file=index_path if weight_map else root / SINGLE_FILE)
        return cls(root, config, tensors, paths, metadata)

    def load(self, name: str, device: str | torch.device = "cpu", pin: bool = False) -> torch.Tensor:
        t = read_tensor(self.tensors[name], pin=pin)
        return t if str(device) == "cpu" else t.to(device, non_blocking=pin)

    @property
    def side_root(self) -> Path:
        """Where the tokenizer and other side files come from."""
        return self.root

    @property
    def hashed_files(self) -> list[Path]:
        """The files whose sha256 the provenance records."""
        return self.files

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def detect_format(self, tensors: dict | None = None) -> SourceFormat:
        """Source precision from config.json, cross-checked against the tensors (by default the
        source's own; pass the canonical view's tensors when a name mapping applies)."""
        tensors = self.tensors if tensors is None else tensors
        qc = self.config.get("quantization_config")
        if qc and not isinstance(qc, dict):
            raise SourceError(f"quantization_config must be an object, got {qc!r}", file=self.root / CONFIG_FILE)
        fp8_weights = [n for n, i in tensors.items() if i.dtype == "F8_E4M3"]
        if not qc:
            if fp8_weights:
                raise SourceError("config.json has no quantization_config but the tensor is float8_e4m3",
                                  file=tensors[fp8_weights[0]].file, tensor=fp8_weights[0])
            scales = [n for n in tensors if n.endswith(SCALE_SUFFIX)]
            if scales:
                raise SourceError("block scale in a checkpoint whose config.json has no quantization_config",
                                  file=tensors[scales[0]].file, tensor=scales[0])
            return SourceFormat.BF16
        method = str(qc.get("quant_method", "")).lower()
        if method != "fp8":
            raise SourceError(f"unsupported source quantization {method!r} (supported: none, fp8 with "
                              "128x128 block scales)", file=self.root / CONFIG_FILE)
        if qc.get("weight_block_size") != [128, 128]:
            raise SourceError(f"unsupported weight_block_size {qc.get('weight_block_size')!r} "
                              "(expected [128, 128])", file=self.root / CONFIG_FILE)
        fmt = SourceFormat.FP8_UE8M0 if str(qc.get("scale_fmt", "")).lower() == "ue8m0" else SourceFormat.FP8
        if not fp8_weights:
            raise SourceError("quantization_config says fp8 but no tensor is float8_e4m3",
                              file=self.root / CONFIG_FILE)
        _check_scales(tensors, fp8_weights, fmt)
        return fmt

    def check_architecture(self) -> "Family":
        """The model family of this config (families/*.yaml), whose shape fields are usable
        (non-negative integers, family rules hold), so that everything after this may rely on them.
        Unknown families are refused with the list of supported ones."""
        from converter.models.family import family_of

        family = family_of(self.config, self.side_root / CONFIG_FILE)
        family.check_config(self.config, self.side_root / CONFIG_FILE)
        self.family = family
        return family


def read_tensor(info: TensorInfo, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every source read goes through here: a safetensors tensor by offset, or a tensor that
    knows how to read itself (a DCP tensor assembled from its chunks)."""
    read = getattr(info, "read", None)
    return _read_safetensors(info, pin=pin, out=out) if read is None else read(pin=pin, out=out)


def map_tensor(info: TensorInfo) -> torch.Tensor | None:
    """A safetensors tensor's bytes mapped from the page cache (see `safetensors.map_tensor`), or
    None (a DCP tensor, a file cut short, a file system that cannot map it): the caller reads them
    (`read_tensor`)."""
    return _map_safetensors(info) if getattr(info, "read", None) is None else None


def _weight_file(root: Path, fname: str, index_path: Path) -> Path:
    """The safetensors file an index entry names, refusing names that leave the checkpoint,
    pickles and files that are not there."""
    rel = Path(fname)
    if "\x00" in fname or rel.is_absolute() or ".." in rel.parts:
        raise SourceError(f"index points outside the checkpoint: {fname!r}", file=index_path)
    if rel.suffix in PICKLE_SUFFIXES:
        raise SourceError(f"index names a pickle file {fname}; mxconv never unpickles untrusted files: "
                          "convert it to safetensors first", file=index_path)
    path = root / rel
    try:
        if not path.is_file():
            raise SourceError(f"index names a missing file {fname}", file=index_path)
    except OSError as e:  # e.g. a name too long for the file system
        raise SourceError(f"index names an unusable file {fname!r}: {e.strerror}", file=index_path) from e
    return path


def _check_scales(tensors: dict, fp8_weights: list[str], fmt: SourceFormat) -> None:
    scale_dtypes = {"F32"} if fmt is SourceFormat.FP8 else {"F32", "U8", "F8_E8M0"}
    for name in fp8_weights:
        info = tensors[name]
        sname = scale_name(name)
        sinfo = tensors.get(sname)
        if sinfo is None:
            raise SourceError(f"float8 weight has no {sname}", file=info.file, tensor=name)
        if len(info.shape) != 2:
            raise SourceError(f"float8 weight must be 2-D, has shape {info.shape}", file=info.file, tensor=name)
        want = fp8_block_scale_shape(info.shape)
        if sinfo.shape != want:
            raise SourceError(f"scale shape {sinfo.shape} does not match weight {info.shape} "
                              f"(expected {want} for 128x128 blocks)", file=sinfo.file, tensor=sname)
        if sinfo.dtype not in scale_dtypes:
            raise SourceError(f"scale dtype {sinfo.dtype} is not valid for {fmt.value} "
                              f"(expected one of {sorted(scale_dtypes)})", file=sinfo.file, tensor=sname)
    for name, sinfo in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            continue
        weight = tensors.get(name[: -len(SCALE_SUFFIX)])
        if weight is None:
            raise SourceError("scale without its weight", file=sinfo.file, tensor=name)
        if weight.dtype != "F8_E4M3":
            raise SourceError(f"block scale for a {weight.dtype} weight (only float8_e4m3 weights have one)",
                              file=sinfo.file, tensor=name)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", file=path) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"not valid JSON: {e}", file=path) from e
    if not isinstance(data, dict):
        raise SourceError("not a JSON object", file=path)
    return data
