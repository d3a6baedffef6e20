"""`mxconv inspect`: what a checkpoint is, for sources in each precision and for conversions
(complete, interrupted, damaged, pre-shuffled)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import converter
from converter.errors import MxconvError
from converter.files import CONFIG_FILE, INDEX_FILE, PROVENANCE_FILE, STATE_DIR
from converter.verify.inspect import exit_status, format_inspect, inspect_checkpoint


@pytest.fixture(scope="module")
def converted(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    dst = root / "mxfp8"
    converter.convert(tiny_sources["bf16"], dst, max_shard_size="1MB", quiet=True)
    return dst


def interrupted_copy(converted, dst, shards_written: int):
    """A copy of `converted` as a conversion interrupted after `shards_written` shards: what
    mxconv writes after the shards (index, config.json, side files, mxconv.json) not there yet."""
    shutil.copytree(converted, dst)
    shards = sorted(set(json.loads((dst / INDEX_FILE).read_text())["weight_map"].values()))
    for name in shards[shards_written:] + [INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE]:
        (dst / name).unlink()
    for path in dst.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            path.unlink()  # the side files (tokenizer, ...) are copied after the shards too
    return len(shards)


@pytest.mark.parametrize("precision, expected", [("bf16", "bf16"), ("fp8", "fp8"), ("fp8_ue8m0", "fp8_ue8m0"),
                                                 ("fp8_ue8m0_u8", "fp8_ue8m0")])
def test_sources(tiny_sources, precision, expected):
    info = inspect_checkpoint(tiny_sources[precision])
    json.dumps(info)  # JSON-ready
    assert info["architecture"] == "DeepseekV3ForCausalLM" and info["hidden_layers"] == 3
    assert info["precision"] == expected
    assert info["mtp"] == {"layers_in_config": 1, "present": True}
    assert info["moe"]["layout"] == "canonical" and info["moe"]["routed_experts"] == 4
    assert info["moe"]["moe_layers"] == 3  # layers 1, 2 and the MTP layer
    assert info["conversion"] == {"by_mxconv": False, "complete": None, "status": "not an mxconv output"}
    assert info["problems"] == []
    by_dtype = info["tensors"]["by_dtype"]
    assert exit_status(info) == 0
    if precision == "bf16":
        assert info["loads_in"] == "any BF16 loader (not quantized)"
        assert info["quantization"] is None and info["high_precision_linears"] == []
        assert by_dtype == {"BF16": {"count": 96, "bytes": by_dtype["BF16"]["bytes"]},
                            "F32": {"count": 3, "bytes": 48}}
    else:
        assert info["quantization"]["quant_method"] == "fp8"
        # what loads the FP8 release: block FP8 loaders, not the MXFP8 sentence of mxconv's outputs
        assert "load it as block FP8, not as MXFP8" in info["loads_in"] and "mxfp8;" not in info["loads_in"]
        assert "loads in                the DeepSeek FP8 release format" in format_inspect(info)
        assert by_dtype["F8_E4M3"]["count"] == 64 + 4  # kv_b_proj is FP8 in the release format
        # what the FP8 release keeps in BF16: lm_head, routers, MTP eh_proj and shared_head.head
        kept = info["high_precision_linears"]
        assert "lm_head" in kept and "model.layers.3.eh_proj" in kept and "model.layers.3.shared_head.head" in kept
        assert not any("kv_b_proj" in m for m in kept)
    assert info["size"]["tensor_bytes"] == sum(v["bytes"] for v in by_dtype.values())


def test_complete_conversion(converted):
    info = inspect_checkpoint(converted)
    assert info["precision"] == "mxfp8"
    assert info["quantization"]["weight_block_size"] == [1, 32] and info["quantization"]["scale_fmt"] == "ue8m0"
    assert info["tensors"]["by_dtype"]["F8_E4M3"]["count"] == 64 and info["tensors"]["by_dtype"]["U8"]["count"] == 64
    kv_b = [m for m in info["high_precision_linears"] if m.endswith("kv_b_proj")]
    assert kv_b == [f"model.layers.{i}.self_attn.kv_b_proj" for i in range(4)]
    # every kept module, then the layer-agnostic entry SGLang's MTP draft needs (issue 18)
    assert info["modules_to_not_convert"] == info["high_precision_linears"] + ["self_attn.kv_b_proj"]
    assert info["loads_in"].startswith("SGLang")
    conv = info["conversion"]
    assert conv["by_mxconv"] and conv["complete"] is True and conv["recipe"] == "deepseek_v3_mxfp8"
    assert conv["source"]["format"] == "bf16"
    assert info["verified"] is None
    assert info["size"]["files"] == 4 and info["size"]["index_total_size"] == info["size"]["tensor_bytes"]
    table = format_inspect(info)
    for row in ("precision               mxfp8", "conversion              complete", "MTP layer               present",
                "modules_to_not_convert  the same 10 modules", "verified                no"):
        assert row in table, table


def test_interrupted_conversion(converted, tmp_path):
    copy = tmp_path / "dst"
    shutil.copytree(converted, copy)
    (copy / PROVENANCE_FILE).unlink()
    assert (copy / STATE_DIR).is_dir()
    info = inspect_checkpoint(copy)
    assert info["conversion"]["by_mxconv"] and info["conversion"]["complete"] is False
    assert info["conversion"]["status"] == ("incomplete: interrupted mxconv conversion: 4 of 4 shards written, no "
                                            "mxconv.json; rerun the same `mxconv convert` command to resume it")
    assert "incomplete" in format_inspect(info)
    assert exit_status(info) == 1


@pytest.mark.parametrize("written", [0, 2])
def test_conversion_interrupted_before_its_config(converted, tmp_path, written):
    """An interrupted DST has no config.json or index yet: inspect says how far it got and how to
    resume it, instead of `not a checkpoint`, and does not call the missing files problems."""
    planned = interrupted_copy(converted, tmp_path / "dst", written)
    info = inspect_checkpoint(tmp_path / "dst")
    json.dumps(info)
    assert info["conversion"] == {"by_mxconv": True, "complete": False, "status": (
        f"incomplete: interrupted mxconv conversion: {written} of {planned} shards written, no mxconv.json; "
        "rerun the same `mxconv convert` command to resume it")}
    assert info["problems"] == [] and info["config_read"] is False
    assert info["size"]["files"] == written and (info["tensors"]["count"] > 0) == (written > 0)
    assert info["precision"] == ("mxfp8" if written else "unknown")
    table = format_inspect(info)
    assert f"conversion              incomplete: interrupted mxconv conversion: {written} of {planned}" in table
    assert "loads in                unknown (no readable config.json)" in table
    assert "None" not in table and "BF16 loader" not in table, table
    assert exit_status(info) == 1


def test_damaged_conversion(converted, tmp_path):
    copy = tmp_path / "dst"
    shutil.copytree(converted, copy)
    shard = sorted(set(json.loads((copy / INDEX_FILE).read_text())["weight_map"].values()))[0]
    os.truncate(copy / shard, (copy / shard).stat().st_size - 10)
    info = inspect_checkpoint(copy)
    assert info["conversion"]["complete"] is False
    assert any("truncated" in p for p in info["problems"])
    assert "damaged" in format_inspect(info)
    assert exit_status(info) == 1


def test_source_with_problems_exits_1(tiny_sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_sources["bf16"], src)
    assert exit_status(inspect_checkpoint(src)) == 0
    shard = sorted(src.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 10)
    info = inspect_checkpoint(src)
    assert info["conversion"]["complete"] is None and any("truncated" in p for p in info["problems"])
    assert exit_status(info) == 1


def test_trtllm_layout(tiny_sources, tmp_path):
    dst = tmp_path / "dst"
    converter.convert(tiny_sources["bf16"], dst, recipe="deepseek_v3_mxfp8_trtllm", max_shard_size="1MB", quiet=True)
    info = inspect_checkpoint(dst)
    assert info["moe"]["layout"].startswith("trtllm") and info["moe"]["layout_in_config"] is True
    assert info["precision"] == "mxfp8"
    assert "trtllm (FlashInfer pre-shuffled)" in format_inspect(info)
    assert info["loads_in"].startswith("NOT SGLang") and "loads in                NOT SGLang" in format_inspect(info)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(MxconvError, match="not a directory"):
        inspect_checkpoint(tmp_path / "missing")
    with pytest.raises(MxconvError, match="not a checkpoint"):
        inspect_checkpoint(tmp_path)


def test_cli_inspect(converted, tmp_path):
    from typer.testing import CliRunner

    from converter.cli import app

    runner = CliRunner()
    table = runner.invoke(app, ["inspect", str(converted)])
    assert table.exit_code == 0 and "precision               mxfp8" in table.output
    as_json = runner.invoke(app, ["inspect", str(converted), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == inspect_checkpoint(converted)
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("mxconv: error:") and "Traceback" not in missing.output
    interrupted_copy(converted, tmp_path / "interrupted", 2)
    table = runner.invoke(app, ["inspect", str(tmp_path / "interrupted")])
    assert "mxconv: error" not in table.output and "interrupted mxconv conversion: 2 of 4" in table.output


def test_cli_inspect_exit_status(converted, tmp_path):
    """A report that lists problems or an unfinished conversion exits 1 (still printed in full),
    so that scripts can tell; a clean one 0."""
    from typer.testing import CliRunner

    from converter.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["inspect", str(converted)]).exit_code == 0
    interrupted_copy(converted, tmp_path / "interrupted", 2)
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    shard = sorted(damaged.glob("*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size - 10)
    for path, shown in ((tmp_path / "interrupted", "interrupted mxconv conversion"), (damaged, "(truncated")):
        for extra in ([], ["--json"]):
            result = runner.invoke(app, ["inspect", str(path), *extra])
            assert result.exit_code == 1 and shown in result.output, result.output
            assert "mxconv: error" not in result.output
