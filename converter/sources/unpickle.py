"""Restricted unpickling of PyTorch Distributed Checkpoint files: the `.metadata` pickle and the
`data.pkl` of a tensor chunk record.

Nothing here imports or calls a class the pickle names. Each allowed global maps to a stand-in
of our own: DCP (and Megatron) metadata classes become plain `Record`s holding their fields,
`torch.Size` a tuple, dtypes their torch dtype objects, paths and layouts strings; a chunk's
`_rebuild_tensor_v2` call becomes a `TensorRecord` (storage, offset, size, stride). Any other
global, and any persistent id in `.metadata`, is refused with one line naming the file and the
global, before anything of the pickle has run.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from converter.errors import SourceError

_DCP = "torch.distributed.checkpoint.metadata"
_SHARD = "torch.distributed._shard.sharded_tensor.metadata"
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"
RECORD_CLASSES = {  # module -> classes kept as plain records of their fields
    _DCP: {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
           "TensorProperties", "MetadataIndex", "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    _SHARD: {"TensorProperties"},
    "torch.distributed._shard.metadata": {"ShardMetadata"},
    _MCORE: {"MCoreMetadata", "MCoreSavePlan"},
}
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "uint8", "int8",
               "int16", "int32", "int64", "bool")
STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16, "FloatStorage": torch.float32,
                  "DoubleStorage": torch.float64, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
                  "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
                  "BoolStorage": torch.bool, "Float8_e4m3fnStorage": torch.float8_e4m3fn,
                  "Float8_e5m2Storage": torch.float8_e5m2}


class Record:
    """A stand-in for an allowed metadata class: its pickled fields as attributes."""

    kind = "Record"
    positional: tuple[str, ...] = ()  # field names of a tuple state (TensorProperties pickles one)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            for part in state:
                vars(self).update(part or {})
        elif isinstance(state, dict):
            vars(self).update(state)
        elif isinstance(state, tuple) and len(state) <= len(self.positional):
            vars(self).update(zip(self.positional, state))
        else:
            raise pickle.UnpicklingError(f"unexpected state of a {self.kind}")

    def __repr__(self):
        return f"{self.kind}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


_POSITIONAL = {"TensorProperties": ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")}


def _record_class(name: str) -> type:
    return type(name, (Record,), {"kind": name, "positional": _POSITIONAL.get(name, ())})


_RECORDS = {(m, n): _record_class(n) for m, names in RECORD_CLASSES.items() for n in names}


def _value(*args):  # Enum members (memory formats), layouts, paths: their pickled argument, inert
    return args[0] if len(args) == 1 else args


def _size(values=()):
    return tuple(int(v) for v in values)


def _ordered_dict(items=()):
    return dict(items)


_CALLABLES = {
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): str,
    ("pathlib", "PosixPath"): _value, ("pathlib", "WindowsPath"): _value, ("pathlib", "PurePosixPath"): _value,
    (_DCP, "_MEM_FORMAT_ENCODING"): _value, (_SHARD, "MEM_FORMAT_ENCODING"): _value,
    ("collections", "OrderedDict"): _ordered_dict,
}
_DTYPES = {("torch", n): getattr(torch, n) for n in DTYPE_NAMES}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _RECORDS.get((module, name)) or _CALLABLES.get((module, name)) or _DTYPES.get((module, name))
        if found is None:
            raise _Refused(f"refused to unpickle global {module}.{name}: not a PyTorch DCP metadata class "
                           "(mxconv unpickles only an allow-list)")
        return found

    def persistent_load(self, pid):
        raise _Refused(f"refused a persistent id {str(pid)[:60]!r}: DCP metadata holds none")


def load_metadata(path: Path) -> Record:
    """The `Metadata` record of a DCP `.metadata` file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", file=path) from e
    return _load(_MetadataUnpickler, data, path, "Metadata")


class TensorRecord:
    """What a chunk's data.pkl says of its tensor: storage (dtype, key, element count), offset,
    size and stride."""

    def __init__(self, storage, offset, size, stride, *_rest):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), _size(size), _size(stride)


def _storage_class(name):
    return ("storage-type", name)


class _ChunkUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return TensorRecord
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if module == "torch" and name in STORAGE_DTYPES:
            return _storage_class(name)
        raise _Refused(f"refused to unpickle global {module}.{name} in a tensor record "
                       "(mxconv unpickles only an allow-list)")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], tuple)
                or not isinstance(pid[2], str) or not isinstance(pid[4], int)):
            raise _Refused(f"unexpected storage reference {str(pid)[:60]!r}")
        return STORAGE_DTYPES[pid[1][1]], pid[2], pid[4]  # dtype, member key, element count


def load_chunk_record(data: bytes, path: Path, tensor: str) -> TensorRecord:
    """The `_rebuild_tensor_v2` arguments of one chunk's data.pkl."""
    return _load(_ChunkUnpickler, data, path, "TensorRecord", tensor)


def _load(cls, data: bytes, path: Path, want: str, tensor: str | None = None):
    try:
        obj = cls(io.BytesIO(data)).load()
    except _Refused as e:
        raise SourceError(str(e), file=path, tensor=tensor) from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, KeyError, IndexError,
            RecursionError, MemoryError) as e:
        raise SourceError(f"not a readable DCP pickle: {type(e).__name__}: {str(e)[:120]}", file=path,
                          tensor=tensor) from None
    kind = getattr(obj, "kind", None) or type(obj).__name__
    if kind not in (want, "MCoreMetadata"):
        raise SourceError(f"holds a {kind}, not a {want}", file=path, tensor=tensor)
    return obj
