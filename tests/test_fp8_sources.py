"""FP8 sources: the DeepSeek V3/R1 release (float32 128x128 scale_inv), V3.1 (UE8M0 scales as
float32 powers of two or uint8 exponents), and the BF16 export recipe. Every byte is compared
with a reference pipeline written in tests/reference.py."""

import json

import pytest
import torch
from helpers import load_all, read_json, same_bytes, tensor_files
from reference import e4m3_decode, reference_fp8_dequant, reference_mxfp8
from safetensors.torch import load_file, save_file

import converter
from converter.errors import SourceError
from converter.models.demo import quantize_fp8_block
from converter.numerics.dispatch import dequantize_fp8_block, dequantize_mxfp8
from converter.numerics.reference import relayout_ue8m0
from converter.sources.checkpoint import SourceCheckpoint


def fp8_weights(source: dict) -> list[str]:
    return [n for n, t in source.items() if t.dtype == torch.float8_e4m3fn]


def ue8m0_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float64) - 127)
    return scale.to(torch.float64)


def test_fixture_splits_partners_across_shards(tiny_sources):
    files = tensor_files(tiny_sources["fp8"])
    split = [n for n in files if n.endswith(".weight") and n + "_scale_inv" in files
             and files[n] != files[n + "_scale_inv"]]
    assert split, "fixture must put some weights and their scales in different shards"


def test_fp8_release_to_mxfp8_is_deepseek_dequant_then_rceil(tiny_sources, tmp_path):
    src = tiny_sources["fp8"]
    dst = tmp_path / "out"
    converter.convert(src, dst, quiet=True, max_shard_size="1MB")
    source, out = load_all(src), load_all(dst)
    for name in fp8_weights(source):
        bf16 = reference_fp8_dequant(source[name], source[name + "_scale_inv"])
        module = name[: -len(".weight")]
        if "kv_b_proj" in name:
            assert out[name].dtype == torch.bfloat16 and same_bytes(out[name], bf16), name
            assert module + ".weight_scale_inv" not in out
            continue
        ref_q, ref_s = reference_mxfp8(bf16)
        assert torch.equal(out[name].view(torch.uint8), ref_q), name
        assert torch.equal(out[module + ".weight_scale_inv"], ref_s), name
    for name, t in source.items():  # everything the release keeps in high precision is copied
        if t.dtype not in (torch.float8_e4m3fn,) and not name.endswith("_scale_inv"):
            assert same_bytes(out[name], t), name
    cfg = read_json(dst / "config.json")
    assert cfg["quantization_config"]["quant_method"] == "mxfp8"
    assert "weight_block_size" in cfg["quantization_config"] and "fmt" in cfg["quantization_config"]
    source_cfg = read_json(src / "config.json")
    source_cfg.pop("quantization_config")
    cfg.pop("quantization_config")
    assert cfg == source_cfg


@pytest.mark.parametrize("fixture", ["fp8_ue8m0", "fp8_ue8m0_u8"])
def test_ue8m0_relayout_is_lossless(tiny_sources, tmp_path, fixture):
    src = tiny_sources[fixture]
    dst = tmp_path / "out"
    converter.convert(src, dst, quiet=True)
    source, out = load_all(src), load_all(dst)
    checked = 0
    for name in fp8_weights(source):
        if "kv_b_proj" in name:
            continue
        module = name[: -len(".weight")]
        assert same_bytes(out[name], source[name]), name  # the FP8 bytes are kept
        n, k = source[name].shape
        tile = ue8m0_values(source[name + "_scale_inv"]).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        src_values = e4m3_decode(source[name].view(torch.uint8)) * tile
        mx_values = e4m3_decode(out[name].view(torch.uint8)) * torch.exp2(
            out[module + ".weight_scale_inv"].to(torch.float64) - 127).repeat_interleave(32, 1)
        assert torch.equal(src_values, mx_values), name
        checked += 1
    assert checked > 10


def test_ue8m0_requantize(tiny_sources, tmp_path):
    src = tiny_sources["fp8_ue8m0"]
    dst = tmp_path / "out"
    converter.convert(src, dst, quiet=True, requantize=True)
    source, out = load_all(src), load_all(dst)
    differs = 0
    for name in fp8_weights(source):
        if "kv_b_proj" in name:
            continue
        bf16 = reference_fp8_dequant(source[name], source[name + "_scale_inv"])
        ref_q, ref_s = reference_mxfp8(bf16)
        assert torch.equal(out[name].view(torch.uint8), ref_q), name
        assert torch.equal(out[name[: -len(".weight")] + ".weight_scale_inv"], ref_s), name
        differs += not same_bytes(out[name], source[name])
    assert differs > 0  # requantizing really yields other bytes than the re-layout
    assert read_json(dst / "mxconv.json")["recipe"]["ue8m0_source"] == "requantize"


def test_bf16_export_recipe(tiny_sources, tmp_path):
    src = tiny_sources["fp8"]
    dst = tmp_path / "bf16"
    converter.convert(src, dst, recipe="deepseek_v3_bf16", quiet=True, workers=2)
    source, out = load_all(src), load_all(dst)
    assert "quantization_config" not in read_json(dst / "config.json")
    assert not [n for n in out if n.endswith("_scale_inv")]
    for name, t in source.items():
        if name.endswith("_scale_inv"):
            continue
        want = reference_fp8_dequant(t, source[name + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
        assert same_bytes(out[name], want), name


def test_real_dimension_partial_edge_tile():
    """kv_a_proj_with_mqa [576, 7168]: a [5, 56] scale whose last row of tiles covers 64 rows."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(576, 7168, generator=gen) * 0.02).to(torch.bfloat16)
    w[512:] *= 40  # make the partial tile's scale differ clearly from the others
    q, s = quantize_fp8_block(w)
    assert s.shape == (5, 56)
    assert torch.equal(dequantize_fp8_block(q, s).view(torch.int16), reference_fp8_dequant(q, s).view(torch.int16))
    _, ue_s = quantize_fp8_block(w, ue8m0=True)
    data, mx_scale = relayout_ue8m0(q, ue_s)
    assert mx_scale.shape == (576, 224)
    assert torch.equal(mx_scale[575], torch.full((224,), int(torch.log2(ue_s[4, 0]).item()) + 127,
                                                 dtype=torch.uint8).where(torch.arange(224) < 4, mx_scale[575]))
    expanded = ue_s.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)
    assert torch.equal(dequantize_mxfp8(data, mx_scale), q.float() * expanded)


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copy a checkpoint, optionally editing its tensors (in the shard that holds each) or config."""
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            if edit_tensors:
                edit_tensors(tensors)
            save_file(tensors, dst / path.name, metadata={"format": "pt"})
        else:
            (dst / path.name).write_bytes(path.read_bytes())
    index = read_json(dst / "model.safetensors.index.json")
    index["weight_map"] = tensor_files(dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    if edit_config:
        cfg = read_json(dst / "config.json")
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


SCALE = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"


@pytest.mark.parametrize("case, edit_tensors, edit_config, message", [
    ("missing scale", lambda t: t.pop(SCALE, None), None, "has no"),
    ("misshapen scale", lambda t: SCALE in t and t.update({SCALE: torch.ones(3, 3)}), None, "scale shape"),
    ("scale dtype", lambda t: SCALE in t and t.update({SCALE: t[SCALE].to(torch.float16)}), None, "scale dtype"),
    ("config says bf16", None, lambda c: c.pop("quantization_config"), "no quantization_config"),
    ("unknown block size", None, lambda c: c["quantization_config"].update(weight_block_size=[1, 128]),
     "weight_block_size"),
])
def test_config_and_tensor_mismatches_name_the_tensor(tiny_sources, tmp_path, case, edit_tensors, edit_config, message):
    bad = _rewrite(tiny_sources["fp8"], tmp_path / "bad", edit_tensors, edit_config)
    with pytest.raises(SourceError, match=message) as err:
        converter.convert(bad, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "mxconv.json").exists()
    if edit_tensors:
        assert "model.layers.1.mlp.experts.2.up_proj" in str(err.value)
        assert ".safetensors" in str(err.value)


def test_each_source_tensor_is_read_once_and_alone(tiny_sources, tmp_path, monkeypatch):
    """Partners in other shards are fetched by offset: no whole-shard loads, no repeated reads
    (a read, or a mapping of the bytes from the page cache, once per tensor)."""
    import converter.sources.checkpoint as ckpt_module

    reads, mapped = [], []
    real_read, real_map = ckpt_module.read_tensor, ckpt_module.map_tensor
    monkeypatch.setattr(ckpt_module, "read_tensor", lambda info, **kw: reads.append(info.name) or real_read(info, **kw))

    def map_tensor(info):
        t = real_map(info)
        if t is not None:
            mapped.append(info.name)
        return t

    monkeypatch.setattr(ckpt_module, "map_tensor", map_tensor)
    converter.convert(tiny_sources["fp8"], tmp_path / "o", quiet=True)
    assert sorted(reads + mapped) == sorted(SourceCheckpoint.open(tiny_sources["fp8"]).tensors)
    assert mapped  # the numerics' inputs are mapped from the page cache
