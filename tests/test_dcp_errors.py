"""Issue 14, bad DCP input: a `.metadata` naming any global outside the allow-list is refused
before anything of it runs; damaged or inconsistent checkpoints fail with one line naming the
file and tensor, exit 1, no traceback and no output that looks complete."""

import dataclasses
import json
import os
import pickle
import shutil

import pytest
from cli_process import run_mxconv

TENSOR = "decoder.layers.0.self_attention.linear_proj.weight"


@pytest.fixture
def case(dcp_sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dcp_sources["megatron"], src)
    return src, dcp_sources["hf"], tmp_path / "dst", tmp_path / "logs"


def edit_metadata(src, change):
    """Rewrite .metadata (our own fixture: a trusted pickle) after change(metadata)."""
    md = pickle.loads((src / ".metadata").read_bytes())
    change(md)
    (src / ".metadata").write_bytes(pickle.dumps(md))


def storage_of(md, fqn):
    return [(k, v) for k, v in md.storage_data.items() if k.fqn == fqn]


def assert_clean_error(result, dst, *must_contain):
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mxconv: error: "), result.stderr
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    assert not (dst / "mxconv.json").exists()
    return lines[0]


def convert(src, cfg, dst, logs):
    return run_mxconv(["convert", src, dst, "--config", cfg, "-q"], logs)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["alone", "inside the metadata"])
def test_metadata_with_a_foreign_global_is_refused_before_it_runs(case, tmp_path, where):
    src, cfg, dst, logs = case
    marker = tmp_path / "payload-ran"
    if where == "alone":
        (src / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        edit_metadata(src, lambda md: setattr(md, "storage_meta", Payload(marker)))
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does run when unpickled freely
    assert (tmp_path / "control").exists()
    line = assert_clean_error(convert(src, cfg, dst, logs), dst, ".metadata", "system", "refused")
    assert not marker.exists(), line
    assert not dst.exists()


def test_truncated_distcp(case):
    src, cfg, dst, logs = case
    path = src / "__1_0.distcp"
    os.truncate(path, path.stat().st_size - 100)
    assert_clean_error(convert(src, cfg, dst, logs), dst, "__1_0.distcp", "truncated", "tensor ")
    assert not dst.exists()


def test_chunk_past_the_end_of_its_file(case):
    src, cfg, dst, logs = case

    def longer(md):
        key, info = storage_of(md, TENSOR)[0]
        size = (src / info.relative_path).stat().st_size
        md.storage_data[key] = dataclasses.replace(info, length=size - info.offset + 10)
    edit_metadata(src, longer)
    assert_clean_error(convert(src, cfg, dst, logs), dst, ".distcp", TENSOR, "ends at byte")


def test_missing_data_file(case):
    src, cfg, dst, logs = case
    (src / "__1_0.distcp").unlink()
    assert_clean_error(convert(src, cfg, dst, logs), dst, "__1_0.distcp", "missing", "tensor ")


@pytest.mark.parametrize("how, says", [("overlap", "overlap"), ("gap", "unsaved")])
def test_overlapping_or_missing_chunks(case, how, says):
    src, cfg, dst, logs = case

    def change(md):
        chunks = md.state_dict_metadata[TENSOR].chunks
        if how == "overlap":
            chunks.append(chunks[0])
        else:
            del chunks[1]
    edit_metadata(src, change)
    assert_clean_error(convert(src, cfg, dst, logs), dst, ".metadata", TENSOR, says)


def test_transformed_records_are_refused(case):
    src, cfg, dst, logs = case

    def zstd(md):
        key, info = storage_of(md, TENSOR)[0]
        md.storage_data[key] = dataclasses.replace(info, transform_descriptors=["stream.zstd/1"])
    edit_metadata(src, zstd)
    assert_clean_error(convert(src, cfg, dst, logs), dst, ".distcp", TENSOR, "transformed")


def test_shape_disagrees_with_config(case, tmp_path):
    src, cfg, dst, logs = case
    other = tmp_path / "cfg"
    shutil.copytree(cfg, other)
    config = json.loads((other / "config.json").read_text())
    config["moe_intermediate_size"] //= 2
    (other / "config.json").write_text(json.dumps(config))
    assert_clean_error(convert(src, other, dst, logs), dst, ".distcp", "config.json", "tensor ")


def test_damaged_chunk_record_fails_the_run_cleanly(case):
    src, cfg, dst, logs = case
    md = pickle.loads((src / ".metadata").read_bytes())
    _, info = storage_of(md, TENSOR)[0]
    path = src / info.relative_path
    with open(path, "r+b") as f:  # wipe the record's zip directory
        f.seek(info.offset + info.length - 22)
        f.write(b"\0" * 22)
    assert_clean_error(convert(src, cfg, dst, logs), dst, info.relative_path, TENSOR, "torch.save archive")
