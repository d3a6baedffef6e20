"""Issue 18 in the main environment: the skip list every SGLang version reads right (and verify
requiring it), and the TRT-LLM pre-shuffled output's loader for FlashInfer's MoE kernel.

The consumers' own code runs in tests/test_sglang_loader.py (its own Python)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import load_all, same_bytes

import converter
from converter.errors import SourceError
from converter.models.trtllm_moe import load_moe_layer, moe_layers
from converter.numerics.trtllm_layout import pack_w13, pack_w2
from converter.run.consumers import LAYER_AGNOSTIC_SKIPS, skip_list, who_loads
from converter.verify.checks import module_listed
from converter.verify.runner import verify_checkpoint

U8, E4M3 = torch.uint8, torch.float8_e4m3fn


@pytest.fixture(scope="module")
def both_layouts(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    canonical = converter.convert(tiny_sources["bf16"], root / "canonical", quiet=True).dst
    trtllm = converter.convert(tiny_sources["bf16"], root / "trtllm", recipe="deepseek_v3_mxfp8_trtllm",
                               quiet=True).dst
    return canonical, trtllm


# ------------------------------------------------------------------------------- skip list


def test_skip_list_adds_the_layer_agnostic_kv_b_proj_once():
    per_layer = ["lm_head", "model.layers.0.self_attn.kv_b_proj", "model.layers.3.self_attn.kv_b_proj"]
    assert skip_list(per_layer) == per_layer + ["self_attn.kv_b_proj"]
    assert skip_list(skip_list(per_layer)) == skip_list(per_layer)  # idempotent (unshuffle re-reads it)
    assert skip_list(["lm_head"]) == ["lm_head"]  # no kept kv_b_proj, no generic entry


def test_entries_match_as_sglang_matches_them():
    assert module_listed("model.layers.61.self_attn.kv_b_proj", ["self_attn.kv_b_proj"])
    assert module_listed("model.decoder.self_attn.kv_b_proj", ["self_attn.kv_b_proj"])  # SGLang's draft name
    assert not module_listed("model.layers.1.mlp.gate_up_proj", ["mlp.gate"])
    assert not module_listed("model.layers.1.self_attn.kv_b_proj_x", ["self_attn.kv_b_proj"])


def test_output_config_lists_it_and_verify_requires_it(both_layouts, tmp_path):
    canonical, _ = both_layouts
    qc = json.loads((canonical / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"][-1] == LAYER_AGNOSTIC_SKIPS[0]
    # Without it: verify fails the config check, naming the SGLang draft problem.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(canonical, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].remove("self_attn.kv_b_proj")
    (bad / "config.json").write_text(json.dumps(cfg))
    src = json.loads((canonical / "mxconv.json").read_text())["source"]["path"]
    report = verify_checkpoint(src, bad, quiet=True)
    messages = [f.message for f in report.failures if f.check == "config"]
    assert any("layer-agnostic entry 'self_attn.kv_b_proj'" in m and "DeepseekV3ForCausalLMNextN" in m
               for m in messages), messages
    assert verify_checkpoint(src, canonical, quiet=True).passed


def test_who_loads():
    assert who_loads({"quant_method": "mxfp8"}).startswith("SGLang")
    assert who_loads({"quant_method": "mxfp8", "moe_weight_layout": {"format": "x"}}).startswith("NOT SGLang")
    assert "unshuffle" in who_loads({"moe_weight_layout": {"format": "x"}})


def test_who_loads_says_what_loads_each_kind_of_checkpoint():
    """Not the MXFP8 sentence for every quantization_config: the FP8 release loads as block FP8,
    BF16 anywhere, and anything else is said to be unknown."""
    release = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for qc in (release, {**release, "scale_fmt": "ue8m0"}):
        said = who_loads(qc, "fp8")
        assert said.startswith("the DeepSeek FP8 release format") and "load it as block FP8, not as MXFP8" in said
        assert "quant_method mxfp8" not in said and "mxconv convert" in said
    assert "UE8M0 scales" in who_loads({**release, "scale_fmt": "ue8m0"})
    assert who_loads(None) == who_loads({}, "bf16") == "any BF16 loader (not quantized)"
    assert who_loads(None, "fp32") == "any loader of unquantized FP32 weights (not quantized)"
    assert who_loads(None, "mxfp8").startswith("unknown: mxfp8 weights but no quantization_config")
    for qc in ({"quant_method": "awq", "bits": 4}, {"quant_method": "fp8", "weight_block_size": [1, 128]},
               {"quant_method": "fp8"}):
        said = who_loads(qc, "fp8")
        assert said.startswith("unknown quantization (quant_method ") and "SGLang" not in said, said
    assert "weight_block_size [1, 128]" in who_loads({"quant_method": "fp8", "weight_block_size": [1, 128]})
    # mxconv's own outputs, as before
    assert who_loads({"quant_method": "mxfp8", "moe_weight_layout": False}).startswith("SGLang (quant_method mxfp8")
    assert who_loads({"quant_method": "mxfp8", "quant_algo": "MXFP8"}).endswith("leave the weights unscaled)")


# ------------------------------------------------------------- TRT-LLM layout for FlashInfer


def test_load_moe_layer_is_the_stacked_packed_experts(both_layouts):
    canonical, trtllm = both_layouts
    cfg = json.loads((canonical / "config.json").read_text())
    layers = moe_layers(trtllm)
    n = cfg["num_hidden_layers"]
    assert layers == list(range(cfg["first_k_dense_replace"], n + cfg["num_nextn_predict_layers"]))
    canon = load_all(canonical)
    E, H, I = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    for layer in layers:
        w = load_moe_layer(trtllm, layer)
        assert (w.num_experts, w.hidden_size, w.intermediate_size) == (E, H, I)
        assert w.gemm1_weights.dtype == E4M3 and tuple(w.gemm1_weights.shape) == (E, 2 * I, H)
        assert w.gemm1_weights_scale.dtype == U8 and tuple(w.gemm1_weights_scale.shape) == (E, 2 * I, H // 32)
        assert w.gemm2_weights.dtype == E4M3 and tuple(w.gemm2_weights.shape) == (E, H, I)
        assert w.gemm2_weights_scale.dtype == U8 and tuple(w.gemm2_weights_scale.shape) == (E, H, I // 32)
        args = w.kernel_args()
        assert args["intermediate_size"] == I and args["local_num_experts"] == E and args["local_expert_offset"] == 0
        for e in range(E):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            g = [canon[p + f"{m}.weight"] for m in ("gate_proj", "up_proj")]
            s = [canon[p + f"{m}.weight_scale_inv"] for m in ("gate_proj", "up_proj")]
            w13, w13_s = pack_w13(g[0], s[0], g[1], s[1])
            w2, w2_s = pack_w2(canon[p + "down_proj.weight"], canon[p + "down_proj.weight_scale_inv"])
            assert same_bytes(w.gemm1_weights[e], w13) and same_bytes(w.gemm1_weights_scale[e], w13_s)
            assert same_bytes(w.gemm2_weights[e], w2) and same_bytes(w.gemm2_weights_scale[e], w2_s)


def test_load_moe_layer_matches_flashinfers_own_helpers(both_layouts):
    """FlashInfer's CPU-capable helpers (the ones SGLang's and vLLM's load-time preparation
    call) applied to the canonical output give the loaded tensors, byte for byte."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import flashinfer
            from flashinfer import utils
    except Exception as exc:  # noqa: BLE001 - any import-time failure means "not usable here"
        pytest.skip(f"flashinfer not importable here (optional extra `flashinfer`): {exc!r}")
    from test_trtllm_layout import reference_swizzle

    canonical, trtllm = both_layouts
    canon = load_all(canonical)
    layer = moe_layers(trtllm)[0]
    w = load_moe_layer(trtllm, layer)
    for e in range(w.num_experts):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        up, gate = canon[p + "up_proj.weight"].view(U8), canon[p + "gate_proj.weight"].view(U8)
        up_s, gate_s = canon[p + "up_proj.weight_scale_inv"], canon[p + "gate_proj.weight_scale_inv"]
        w13 = flashinfer.shuffle_matrix_a(flashinfer.reorder_rows_for_gated_act_gemm(torch.cat([up, gate])), 128)
        sc = flashinfer.reorder_rows_for_gated_act_gemm(torch.cat([up_s, gate_s]))
        w13_s = reference_swizzle(sc[utils.get_shuffle_matrix_sf_a_row_indices(sc, 128)])
        down, down_s = canon[p + "down_proj.weight"].view(U8), canon[p + "down_proj.weight_scale_inv"]
        w2 = flashinfer.shuffle_matrix_a(down, 128)
        w2_s = reference_swizzle(down_s[utils.get_shuffle_matrix_sf_a_row_indices(down_s, 128)])
        assert torch.equal(w.gemm1_weights[e].view(U8), w13) and torch.equal(w.gemm2_weights[e].view(U8), w2)
        assert torch.equal(w.gemm1_weights_scale[e].reshape(-1), w13_s.reshape(-1))
        assert torch.equal(w.gemm2_weights_scale[e].reshape(-1), w2_s.reshape(-1))


def test_load_moe_layer_errors(both_layouts):
    canonical, trtllm = both_layouts
    with pytest.raises(SourceError, match="not a TRT-LLM pre-shuffled checkpoint"):
        load_moe_layer(canonical, 1)
    with pytest.raises(SourceError, match="no pre-shuffled experts in layer 0"):
        load_moe_layer(trtllm, 0)  # the dense layer


# ------------------------------------------------------------------------ vLLM's names


def test_vllm_recipe_names_scales_weight_scale_and_verifies(tiny_sources, tmp_path):
    dst = converter.convert(tiny_sources["fp8"], tmp_path / "vllm", recipe="deepseek_v3_mxfp8_vllm", quiet=True).dst
    canon = converter.convert(tiny_sources["fp8"], tmp_path / "canon", quiet=True).dst
    got, want = load_all(dst), load_all(canon)
    assert not any(n.endswith("_scale_inv") for n in got)
    assert {n[:-4] if n.endswith(".weight_scale_inv") else n for n in want} == set(got)
    for n, t in want.items():  # the same bytes under the other name
        assert same_bytes(got[n[:-4] if n.endswith(".weight_scale_inv") else n], t), n
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "MXFP8" and qc["ignore"] == qc["ignored_layers"] == qc["modules_to_not_convert"]
    assert verify_checkpoint(tiny_sources["fp8"], dst, quiet=True).passed
    assert who_loads(qc).startswith("SGLang") and "NOT transformers" in who_loads(qc)


def test_scale_name_is_validated():
    from converter.errors import RecipeError
    from converter.plan.recipe import load_recipe

    with pytest.raises(RecipeError, match="scale_name must be one of"):  # no such flag: the recipe key
        load_recipe("deepseek_v3_mxfp8").with_options(scale_name="scale")
    with pytest.raises(RecipeError, match="moe_layout trtllm keeps scale_name"):
        load_recipe("deepseek_v3_mxfp8_trtllm").with_options(scale_name="weight_scale")


def test_verify_catches_a_skip_list_key_that_disagrees(both_layouts, tmp_path):
    import shutil

    canonical, _ = both_layouts
    bad = tmp_path / "bad"
    shutil.copytree(canonical, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignored_layers"] = ["lm_head"]
    (bad / "config.json").write_text(json.dumps(cfg))
    src = json.loads((canonical / "mxconv.json").read_text())["source"]["path"]
    messages = [f.message for f in verify_checkpoint(src, bad, quiet=True).failures if f.check == "config"]
    assert any("ignored_layers differs from modules_to_not_convert" in m for m in messages), messages

