"""Issue 14: the restricted unpickler reads DCP metadata of current and older layouts (torch's
_shard TensorProperties with its tuple state, Megatron's MCoreMetadata) as plain records, and
refuses every other global, in `.metadata` and in a chunk's data.pkl alike."""

import io
import os
import pickle
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor.metadata import (
    TensorProperties as OldProperties,
)
from torch.distributed.checkpoint.metadata import Metadata

from converter.errors import SourceError
from converter.sources.unpickle import Record, load_chunk_record, load_metadata


def test_current_metadata_reads_as_records(tmp_path):
    dcp.save({"w": torch.ones(4, 6, dtype=torch.bfloat16), "b": io.BytesIO(b"x")}, checkpoint_id=tmp_path / "c",
             no_dist=True)
    md = load_metadata(tmp_path / "c" / ".metadata")
    assert isinstance(md, Record) and md.kind == "Metadata"
    w = md.state_dict_metadata["w"]
    assert w.kind == "TensorStorageMetadata" and w.size == (4, 6) and w.properties.dtype is torch.bfloat16
    assert [c.offsets for c in w.chunks] == [(0, 0)] and md.state_dict_metadata["b"].kind == "BytesStorageMetadata"
    infos = {k.fqn: v for k, v in md.storage_data.items()}
    assert infos["w"].relative_path == "__0_0.distcp" and infos["w"].length > 0


def test_older_layouts_and_megatron_metadata(tmp_path):
    module = types.ModuleType("mxfake")  # pickled under a short name, renamed in the (protocol 2) text

    @dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict | None = None

    MCoreMetadata.__module__ = "mxfake"
    MCoreMetadata.__qualname__ = "MCoreMetadata"
    module.MCoreMetadata = MCoreMetadata
    sys.modules["mxfake"] = module
    try:
        md = MCoreMetadata(state_dict_metadata={"p": OldProperties(dtype=torch.float16)}, mcore_data={"a": 1})
        data = pickle.dumps(md, protocol=2)
    finally:
        del sys.modules["mxfake"]
    assert b"cmxfake\nMCoreMetadata\n" in data and b"sharded_tensor.metadata\nTensorProperties" in data
    data = data.replace(b"cmxfake\n", b"cmegatron.core.dist_checkpointing.strategies.torch\n")
    (tmp_path / ".metadata").write_bytes(data)
    got = load_metadata(tmp_path / ".metadata")
    assert got.kind == "MCoreMetadata" and got.mcore_data == {"a": 1}
    props = got.state_dict_metadata["p"]
    assert props.kind == "TensorProperties" and props.dtype is torch.float16


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_foreign_globals_are_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": Payload(marker)}))
    with pytest.raises(SourceError, match=r"\.metadata.*refused to unpickle global (posix|os)\.system"):
        load_metadata(tmp_path / ".metadata")
    with pytest.raises(SourceError, match="refused to unpickle global (posix|os).system in a tensor record"):
        load_chunk_record(pickle.dumps(Payload(marker), protocol=2), tmp_path / "x.distcp", "w")
    with pytest.raises(SourceError, match="holds a dict"):  # allowed pieces, but not a Metadata
        (tmp_path / "m2").write_bytes(pickle.dumps({"a": 1}))
        load_metadata(tmp_path / "m2")
    assert not marker.exists()


def test_chunk_record_gives_storage_offset_and_strides():
    buf = io.BytesIO()
    torch.save(torch.arange(12.0).view(3, 4).t().contiguous().t(), buf)
    import zipfile

    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    rec = load_chunk_record(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))), "f", "t")
    assert rec.size == (3, 4) and rec.stride == (1, 3) and rec.offset == 0
    assert rec.storage == (torch.float32, "0", 12)
