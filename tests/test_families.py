"""Model families as data (families/*.yaml): DeepSeek V3.2 (lightning indexer), Kimi K2 and
Qwen3-MoE converted end to end, every output byte checked against the independent reference
(tests/reference.py); which modules are quantized is written here from SGLang's model code, not
read from the family files. Verify passes on each and catches corrupted indexer and attention
weights; recipes are chosen per family; unknown families and configs that disagree with the
tensors are clear errors."""

import json

import pytest
import torch
from helpers import load_all, read_json, same_bytes
from reference import reference_fp8_dequant, reference_mxfp8
from test_mapping_convert import rename_checkpoint
from test_trtllm_recipe import spec_shuffle, spec_unswizzle, spec_w13_rows
from test_verify import failures, flip_byte, named

import converter
from converter.errors import MappingError, RecipeError, SourceError
from converter.models.demo import build_checkpoint, tiny_config
from converter.models.family import family_names, load_family, parse_family
from converter.verify.runner import verify_checkpoint

# What SGLang builds with a quant_config (so what an MXFP8 checkpoint must hold as MXFP8):
# DeepSeek V2/V3 MLA and MLPs in deepseek_v2.py; the V3.2 indexer's wq_b and wk
# (nsa_indexer.py, Indexer.__init__), not its weights_proj; Qwen3-MoE's q/k/v/o and MLPs
# (qwen3_moe.py), not the router. kv_b_proj stays BF16 by the DeepSeek recipes' choice.
DEEPSEEK_QUANTIZED = {"q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj",
                      "down_proj"}
V32_QUANTIZED = DEEPSEEK_QUANTIZED | {"indexer.wq_b", "indexer.wk"}
QWEN3_QUANTIZED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def quantized_by(modules: set[str]):
    def pred(name: str) -> bool:
        parts = name.split(".")
        return parts[-1] == "weight" and (parts[-2] in modules or ".".join(parts[-3:-1]) in modules)
    return pred


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "v32_bf16": build_checkpoint(root / "v32-bf16", family="deepseek_v32", seed=11),
        "v32_fp8": build_checkpoint(root / "v32-fp8", family="deepseek_v32", precision="fp8", seed=12),
        "kimi": build_checkpoint(root / "kimi", family="kimi_k2", seed=13),
        "qwen": build_checkpoint(root / "qwen", family="qwen3_moe", seed=14),
    }


def check_every_byte(src, dst, quantized) -> dict:
    """Every output tensor against the reference: quantized linears are reference MXFP8 of the
    source value (FP8 sources: DeepSeek's dequantization first), the rest the source value."""
    source, out = load_all(src), load_all(dst)
    expected = set()
    for name, t in source.items():
        if name.endswith("_scale_inv"):
            continue
        value = reference_fp8_dequant(t, source[name + "_scale_inv"]) if name + "_scale_inv" in source else t
        if quantized(name):
            module = name[: -len(".weight")]
            ref_q, ref_s = reference_mxfp8(value)
            assert out[name].dtype == torch.float8_e4m3fn, name
            assert torch.equal(out[name].view(torch.uint8), ref_q), name
            assert same_bytes(out[module + ".weight_scale_inv"], ref_s), name  # uint8, as the reference
            expected |= {name, module + ".weight_scale_inv"}
        else:
            assert same_bytes(out[name], value), name
            expected.add(name)
    assert set(out) == expected
    return out


def check_packed_experts(canonical, shuffled, layers, experts, inter):
    """The TRT-LLM output is the canonical one with the routed experts packed per SPEC 4."""
    canon, out = load_all(canonical), load_all(shuffled)
    hidden = canon["model.norm.weight"].shape[0]
    rows13, rows2 = spec_w13_rows(inter), spec_shuffle(hidden)
    for layer in layers:
        for e in experts:
            p = f"model.layers.{layer}.mlp.experts.{e}."
            up_gate = torch.cat([canon[p + "up_proj.weight"].view(torch.uint8),
                                 canon[p + "gate_proj.weight"].view(torch.uint8)])
            up_gate_s = torch.cat([canon[p + "up_proj.weight_scale_inv"], canon[p + "gate_proj.weight_scale_inv"]])
            assert out[p + "w13_weight_scale_inv"].dtype == out[p + "w2_weight_scale_inv"].dtype == torch.uint8
            assert torch.equal(out[p + "w13_weight"].view(torch.uint8), up_gate[rows13])
            assert torch.equal(spec_unswizzle(out[p + "w13_weight_scale_inv"]), up_gate_s[rows13])
            assert torch.equal(out[p + "w2_weight"].view(torch.uint8),
                               canon[p + "down_proj.weight"].view(torch.uint8)[rows2])
            assert torch.equal(spec_unswizzle(out[p + "w2_weight_scale_inv"]),
                               canon[p + "down_proj.weight_scale_inv"][rows2])
    rest = [n for n in canon if ".mlp.experts." not in n]
    assert rest and all(same_bytes(out[n], canon[n]) for n in rest)


def passes(src, dst, **kwargs):
    report = verify_checkpoint(src, dst, quiet=True, **kwargs)
    assert report.passed, [f.describe() for f in report.failures]
    return report


# ----------------------------------------------------------------------------- family files


def test_family_files_load_and_hold_what_they_claim():
    assert {"deepseek_v3", "deepseek_v32", "kimi_k2", "qwen3_moe"} <= set(family_names())
    for name in family_names():
        fam = load_family(name)
        assert fam.name == name and fam.demo_config and fam.default_recipe()
        shapes = fam.tensors(fam.demo_config)
        assert "model.embed_tokens.weight" in shapes and "lm_head.weight" in shapes
    v32 = load_family("deepseek_v32").tensors(tiny_config("deepseek_v32"))
    c = tiny_config("deepseek_v32")
    for layer in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):  # the MTP layer has one too
        p = f"model.layers.{layer}.self_attn.indexer."
        assert v32[p + "wq_b.weight"][0] == (c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"])
        assert v32[p + "wk.weight"][0] == (c["index_head_dim"], c["hidden_size"])
        assert v32[p + "weights_proj.weight"][0] == (c["index_n_heads"], c["hidden_size"])
        assert v32[p + "k_norm.weight"][:2] == ((c["index_head_dim"],), "F32")
        assert v32[p + "k_norm.bias"][:2] == ((c["index_head_dim"],), "F32")
    q = tiny_config("qwen3_moe")
    qwen = load_family("qwen3_moe").tensors(q)
    assert "model.layers.1.mlp.gate_proj.weight" in qwen and "model.layers.1.mlp.gate.weight" not in qwen  # mlp_only
    assert qwen["model.layers.0.self_attn.k_proj.weight"][0] == (q["num_key_value_heads"] * q["head_dim"],
                                                                 q["hidden_size"])
    assert not any("shared_experts" in n or "layers.3." in n for n in qwen)  # no shared expert, no MTP


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown key"),
    ({"moe_layer": "__import__('os')"}, "bad expression"),
    ({"moe_layer": "config.layer"}, "bad expression"),
    ({"recipes": {"trtllm": "x"}}, "mxfp8"),
    ({"tensors": {"layer": [{"name": "a.weight"}]}}, "shape"),
])
def test_bad_family_files_are_rejected(change, message):
    import yaml

    from converter.models.family import _families_dir

    data = yaml.safe_load((_families_dir() / "qwen3_moe.yaml").read_text())
    data.update(change)
    with pytest.raises(SourceError, match=message):
        parse_family(data, "bad.yaml")


def test_unknown_family_is_refused_with_the_supported_ones(sources, tmp_path):
    src = tmp_path / "llama"
    build_checkpoint(src, family="qwen3_moe")
    cfg = read_json(src / "config.json")
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="unsupported architecture") as err:
        converter.convert(src, tmp_path / "out", quiet=True)
    for name in ("deepseek_v3", "deepseek_v32", "kimi_k2", "qwen3_moe", "Qwen3MoeForCausalLM"):
        assert name in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SourceError, match="supported: deepseek_v3, deepseek_v32, kimi_k2, qwen3_moe"):
        load_family("llama")


# ----------------------------------------------------------------------------- DeepSeek V3.2


@pytest.mark.parametrize("kind", ["v32_bf16", "v32_fp8"])
def test_deepseek_v32_every_byte_canonical_and_trtllm(sources, tmp_path, kind):
    src = sources[kind]
    canonical, shuffled = tmp_path / "canonical", tmp_path / "trtllm"
    result = converter.convert(src, canonical, quiet=True, max_shard_size="1MB")
    assert result.plan.recipe.name == "deepseek_v32_mxfp8"  # the family's default
    out = check_every_byte(src, canonical, quantized_by(V32_QUANTIZED))
    c = tiny_config("deepseek_v32")
    layers = range(c["num_hidden_layers"] + c["num_nextn_predict_layers"])
    skip = read_json(canonical / "config.json")["quantization_config"]["modules_to_not_convert"]
    for layer in layers:
        p = f"model.layers.{layer}.self_attn."
        assert out[p + "indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
        assert out[p + "indexer.wk.weight"].dtype == torch.float8_e4m3fn
        assert out[p + "indexer.weights_proj.weight"].dtype == torch.bfloat16
        assert out[p + "indexer.k_norm.weight"].dtype == out[p + "indexer.k_norm.bias"].dtype == torch.float32
        assert out[p + "kv_b_proj.weight"].dtype == torch.bfloat16
        assert p + "indexer.weights_proj" in skip and p + "kv_b_proj" in skip
        assert p + "indexer.wq_b" not in skip and p + "indexer.wk" not in skip
    passes(src, canonical)
    converter.convert(src, shuffled, recipe="trtllm", quiet=True, max_shard_size="1MB")
    assert read_json(shuffled / "mxconv.json")["recipe"]["name"] == "deepseek_v32_mxfp8_trtllm"
    check_packed_experts(canonical, shuffled, range(1, 4), range(c["n_routed_experts"]), c["moe_intermediate_size"])
    passes(src, shuffled)


def test_deepseek_v32_fp8_source_has_the_release_layout(sources):
    """As in the release (DeepSeek-V3.2-Exp inference/model.py: Indexer): wq_b and wk FP8 with a
    128x128 weight_scale_inv, weights_proj BF16, k_norm float32 without scales."""
    t = load_all(sources["v32_fp8"])
    p = "model.layers.0.self_attn.indexer."
    assert t[p + "wq_b.weight"].dtype == t[p + "wk.weight"].dtype == torch.float8_e4m3fn
    assert t[p + "wq_b.weight_scale_inv"].dtype == torch.float32 and p + "wk.weight_scale_inv" in t
    assert t[p + "weights_proj.weight"].dtype == torch.bfloat16 and p + "weights_proj.weight_scale_inv" not in t
    assert t[p + "k_norm.weight"].dtype == torch.float32 and p + "k_norm.weight_scale_inv" not in t


def test_deepseek_v32_ue8m0_release_relayout_is_lossless(tmp_path):
    """The V3.2 release's config says scale_fmt ue8m0 (power-of-two tile scales): indexer wq_b and
    wk, like every FP8 linear, keep their FP8 bytes and get their tile exponent per 1x32 block."""
    from reference import e4m3_decode

    src = build_checkpoint(tmp_path / "src", family="deepseek_v32", precision="fp8_ue8m0", ue8m0_as_uint8=True,
                           seed=15)
    dst = tmp_path / "out"
    converter.convert(src, dst, quiet=True)
    source, out = load_all(src), load_all(dst)
    indexer = [n for n in source if ".indexer." in n and source[n].dtype == torch.float8_e4m3fn]
    assert len(indexer) == 8  # wq_b and wk of 3 layers + MTP
    for name in indexer:
        module = name[: -len(".weight")]
        assert same_bytes(out[name], source[name]), name
        n, k = source[name].shape
        tile = torch.exp2(source[name + "_scale_inv"].to(torch.float64) - 127)
        tile = tile.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        mx = torch.exp2(out[module + ".weight_scale_inv"].to(torch.float64) - 127).repeat_interleave(32, 1)
        assert torch.equal(e4m3_decode(source[name].view(torch.uint8)) * tile,
                           e4m3_decode(out[name].view(torch.uint8)) * mx), name
    passes(src, dst)


def test_deepseek_v32_under_deepseek_inference_names(sources, tmp_path):
    want = tmp_path / "hf"
    converter.convert(sources["v32_fp8"], want, quiet=True)
    src = rename_checkpoint(sources["v32_fp8"], tmp_path / "src", "deepseek")
    assert "layers.0.attn.indexer.wq_b.scale" in load_all(src)
    result = converter.convert(src, tmp_path / "out", quiet=True)
    assert result.mapping == "deepseek"
    got, ref = load_all(tmp_path / "out"), load_all(want)
    assert got.keys() == ref.keys() and all(same_bytes(got[n], ref[n]) for n in got)


def test_megatron_indexer_names_are_not_mapped(sources, tmp_path):
    """slime's Megatron -> HF conversion half-swaps the indexer's rope rows; a rename would be wrong."""
    tensors = load_all(sources["v32_bf16"])
    renamed = {"decoder.layers.0.self_attention.wq_b.weight": tensors["model.layers.0.self_attn.indexer.wq_b.weight"],
               "embedding.word_embeddings.weight": tensors["model.embed_tokens.weight"]}
    from converter.models.demo import write_sharded

    meg = tmp_path / "meg"
    meg.mkdir()
    write_sharded(meg, renamed, shards=1, interleave=False)
    (meg / "config.json").write_text((sources["v32_bf16"] / "config.json").read_text())
    with pytest.raises(MappingError, match="decoder.layers.0.self_attention.wq_b.weight"):
        converter.convert(meg, tmp_path / "out", mapping="megatron", quiet=True)


@pytest.fixture(scope="module")
def v32_converted(sources, tmp_path_factory):
    dst = tmp_path_factory.mktemp("v32") / "out"
    converter.convert(sources["v32_bf16"], dst, quiet=True, max_shard_size="1MB")
    return sources["v32_bf16"], dst


@pytest.mark.parametrize("tensor", ["model.layers.2.self_attn.indexer.wq_b.weight",
                                    "model.layers.3.self_attn.indexer.wk.weight_scale_inv",
                                    "model.layers.1.self_attn.indexer.weights_proj.weight",
                                    "model.layers.0.self_attn.indexer.k_norm.bias"])
def test_verify_catches_a_corrupted_indexer(v32_converted, tmp_path, tensor):
    import shutil

    src, dst = v32_converted
    copy = tmp_path / "dst"
    shutil.copytree(dst, copy)
    flip_byte(copy, tensor, element=3, mask=0x01)
    report = verify_checkpoint(src, copy, quiet=True)
    assert not report.passed
    assert [f.tensor for f in failures(report, "bytes")] == [tensor]


def test_verify_flags_a_quantized_weights_proj(sources, tmp_path):
    from converter.plan.recipe import load_recipe

    base = load_recipe("deepseek_v32_mxfp8")
    recipe = base.with_options(quantize=base.quantize + ("model.layers.*.self_attn.indexer.weights_proj",),
                               name="weights_proj_quantized")
    dst = tmp_path / "dst"
    converter.convert(sources["v32_bf16"], dst, recipe=recipe, quiet=True)
    report = verify_checkpoint(sources["v32_bf16"], dst, quiet=True)
    name = "model.layers.0.self_attn.indexer.weights_proj.weight"
    assert not report.passed and "must stay BF16" in named(report, "config", name)[0].message
    assert report.check_passed("bytes")  # the recipe was followed; SGLang would not load it


# ----------------------------------------------------------------------------- Kimi K2


def test_kimi_k2_every_byte_and_verify(sources, tmp_path):
    src, dst = sources["kimi"], tmp_path / "out"
    cfg = read_json(src / "config.json")
    assert cfg["n_routed_experts"] == 384 and cfg["model_type"] == "kimi_k2"
    result = converter.convert(src, dst, quiet=True)
    assert result.plan.recipe.name == "deepseek_v3_mxfp8"  # same tensors as DeepSeek V3, same recipe
    out = check_every_byte(src, dst, quantized_by(DEEPSEEK_QUANTIZED))
    assert out["model.layers.1.mlp.experts.383.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.gate" in read_json(dst / "config.json")["quantization_config"]["modules_to_not_convert"]
    passes(src, dst)


# ----------------------------------------------------------------------------- Qwen3-MoE


@pytest.fixture(scope="module")
def qwen_converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    src = sources["qwen"]
    converter.convert(src, root / "canonical", quiet=True, max_shard_size="1MB")
    converter.convert(src, root / "trtllm", recipe="qwen3_moe_mxfp8_trtllm", quiet=True, max_shard_size="1MB")
    return src, root / "canonical", root / "trtllm"


def test_qwen3_moe_every_byte(qwen_converted):
    src, dst, _ = qwen_converted
    out = check_every_byte(src, dst, quantized_by(QWEN3_QUANTIZED))
    cfg = read_json(dst / "config.json")
    assert cfg["quantization_config"]["modules_to_not_convert"] == [
        "lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]  # router and head only
    assert read_json(dst / "mxconv.json")["recipe"]["name"] == "qwen3_moe_mxfp8"
    assert out["model.layers.1.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn  # the dense (mlp_only) layer
    assert out["model.layers.0.self_attn.q_norm.weight"].dtype == torch.bfloat16
    assert not any("kv_b_proj" in n for n in out)


def test_qwen3_moe_verifies_with_logits(qwen_converted):
    src, dst, _ = qwen_converted
    report = passes(src, dst, logits=True)
    assert report.check_passed("logits")


def test_qwen3_moe_trtllm_layout(qwen_converted):
    src, canonical, shuffled = qwen_converted
    c = tiny_config("qwen3_moe")
    check_packed_experts(canonical, shuffled, [0, 2], range(c["num_experts"]), c["moe_intermediate_size"])
    passes(src, shuffled)


def test_qwen3_moe_unshuffle_restores_canonical(qwen_converted, tmp_path):
    from converter.run.unshuffle import unshuffle

    src, canonical, shuffled = qwen_converted
    unshuffle(shuffled, tmp_path / "restored", quiet=True)
    a, b = load_all(canonical), load_all(tmp_path / "restored")
    assert a.keys() == b.keys() and all(same_bytes(a[n], b[n]) for n in a)
    passes(src, tmp_path / "restored")


def test_qwen3_moe_fp8_source(tmp_path):
    """Qwen3-*-FP8 releases: the same 128x128 block format; router, lm_head and norms unquantized."""
    src = build_checkpoint(tmp_path / "src", family="qwen3_moe", precision="fp8", seed=6)
    source = load_all(src)
    assert source["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn
    assert source["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    converter.convert(src, tmp_path / "out", quiet=True)
    check_every_byte(src, tmp_path / "out", quantized_by(QWEN3_QUANTIZED))
    passes(src, tmp_path / "out")


def test_qwen3_moe_last_8_layers_in_bf16(tmp_path):
    cfg = dict(tiny_config("qwen3_moe"), num_hidden_layers=10, mlp_only_layers=[], max_window_layers=10)
    src = build_checkpoint(tmp_path / "src", cfg, seed=5)
    dst = tmp_path / "out"
    converter.convert(src, dst, recipe="last8_bf16", quiet=True)
    assert read_json(dst / "mxconv.json")["recipe"]["name"] == "qwen3_moe_mxfp8_last8_bf16"
    check_every_byte(src, dst, lambda n: quantized_by(QWEN3_QUANTIZED)(n) and
                     int(n.split(".")[2]) < 2 if n.startswith("model.layers.") else False)
    skip = read_json(dst / "config.json")["quantization_config"]["modules_to_not_convert"]
    for layer in range(2, 10):
        assert f"model.layers.{layer}.self_attn.q_proj" in skip
        assert f"model.layers.{layer}.mlp.experts.0.up_proj" in skip
    assert not any(m.startswith(("model.layers.0.self_attn", "model.layers.1.self_attn")) for m in skip)
    passes(src, dst)


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.k_proj.weight",
                                    "model.layers.2.self_attn.o_proj.weight_scale_inv",
                                    "model.layers.1.self_attn.k_norm.weight"])
def test_verify_catches_a_corrupted_attention_weight(qwen_converted, tmp_path, tensor):
    import shutil

    src, dst, _ = qwen_converted
    copy = tmp_path / "dst"
    shutil.copytree(dst, copy)
    flip_byte(copy, tensor, element=7, mask=0x02)
    report = verify_checkpoint(src, copy, quiet=True)
    assert not report.passed and [f.tensor for f in failures(report, "bytes")] == [tensor]


# ----------------------------------------------------------------------------- recipes, mappings, bad configs


def test_recipes_are_chosen_per_family(sources, tiny_sources, tmp_path):
    with pytest.raises(RecipeError, match="for deepseek_v3, kimi_k2 models, this source is qwen3_moe; use .*qwen3"):
        converter.convert(sources["qwen"], tmp_path / "a", recipe="deepseek_v3_mxfp8", quiet=True)
    with pytest.raises(RecipeError, match="qwen3_moe models"):
        converter.convert(tiny_sources["bf16"], tmp_path / "b", recipe="qwen3_moe_mxfp8", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for src, role, want in [(tiny_sources["bf16"], None, "deepseek_v3_mxfp8"),
                            (tiny_sources["bf16"], "trtllm", "deepseek_v3_mxfp8_trtllm"),
                            (sources["qwen"], "trtllm", "qwen3_moe_mxfp8_trtllm"),
                            (sources["v32_fp8"], "bf16", "deepseek_v3_bf16")]:
        plan = converter.convert(src, tmp_path / "dry", recipe=role, dry_run=True, quiet=True).plan
        assert plan.recipe.name == want


def test_qwen3_has_no_megatron_mapping(sources, tmp_path):
    with pytest.raises(MappingError, match="no rules for qwen3_moe"):
        converter.convert(sources["qwen"], tmp_path / "out", mapping="megatron", quiet=True)


def _edit(src, dst, drop=(), add=None, config=None):
    """A copy of `src` with tensors dropped or added and config keys changed."""
    from converter.models.demo import write_sharded

    tensors = {n: t for n, t in load_all(src).items() if n not in drop}
    tensors.update(add or {})
    dst.mkdir()
    write_sharded(dst, tensors, shards=2, interleave=True)
    cfg = read_json(src / "config.json")
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("kwargs, message, tensor", [
    ({"drop": ["model.layers.1.self_attn.k_norm.weight"]}, "missing from the checkpoint",
     "model.layers.1.self_attn.k_norm.weight"),
    ({"add": {"model.layers.0.self_attn.indexer.weights_proj.weight": torch.zeros(4, 256, dtype=torch.bfloat16)}},
     "no such tensor", "model.layers.0.self_attn.indexer.weights_proj.weight"),
    ({"config": {"num_key_value_heads": 4}}, "does not match config.json", "model.layers.0.self_attn.k_proj.weight"),
    ({"config": {"mlp_only_layers": []}}, "no such tensor", "model.layers.1.mlp.gate_proj.weight"),
    ({"config": {"num_key_value_heads": 3}}, "not a multiple of num_key_value_heads", None),
    ({"config": {"mlp_only_layers": 1}}, "does not give .*mlp_only_layers.* a value", None),
])
def test_config_and_tensors_disagree_is_a_clear_error(sources, tmp_path, kwargs, message, tensor):
    src = _edit(sources["qwen"], tmp_path / "src", **kwargs)
    with pytest.raises(SourceError, match=message) as err:
        converter.convert(src, tmp_path / "out", quiet=True)
    if tensor:
        assert tensor in str(err.value)
    assert err.value.file and not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("kind, recipe", [("v32_fp8", "deepseek_v32_mxfp8_trtllm"), ("qwen", "qwen3_moe_mxfp8"),
                                          ("qwen", "qwen3_moe_mxfp8_trtllm")])
def test_families_on_cuda_give_the_cpu_bytes(sources, tmp_path, kind, recipe):
    for device in ("cpu", "cuda"):
        converter.convert(sources[kind], tmp_path / device, recipe=recipe, device=device, quiet=True,
                          max_shard_size="1MB")
    cpu, gpu = load_all(tmp_path / "cpu"), load_all(tmp_path / "cuda")
    assert set(cpu) == set(gpu) and all(same_bytes(cpu[n], gpu[n]) for n in cpu)
