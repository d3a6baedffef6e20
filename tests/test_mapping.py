"""Name mapping stage (converter/mapping.py, mappings/*.yaml)."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch

from converter.errors import MappingError
from converter.mapping.names import (
    BUILTIN,
    Derivation,
    derived_shape,
    detect_mapping,
    load_mapping,
    materialize,
)

LAYERS = 61  # DeepSeek V3 num_hidden_layers; layer 61 is the MTP layer

# DeepSeek V3 671B sizes (SPEC 1)
V3 = dict(hidden=7168, layers=61, dense=3, experts=256, moe_inter=2048, dense_inter=18432, vocab=129280,
          q_lora=1536, kv_lora=512, heads=128, qk_head=192, v_head=128, rope=64)
# a tiny model with the same structure; every split part is a whole number of 128-blocks
TINY = dict(hidden=256, layers=4, dense=1, experts=4, moe_inter=256, dense_inter=384, vocab=512,
            q_lora=128, kv_lora=128, heads=2, qk_head=96, v_head=64, rope=32)


def model_shapes(c: dict, *, fp8: bool, mtp: int = 1) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of a DeepSeek V3 shaped checkpoint."""
    h, out = c["hidden"], {}

    def linear(name, n, k, quantized=True):
        out[f"{name}.weight"] = (n, k)
        if fp8 and quantized:
            out[f"{name}.weight_scale_inv"] = (math.ceil(n / 128), math.ceil(k / 128))

    def mlp(prefix, inter):
        linear(f"{prefix}.gate_proj", inter, h)
        linear(f"{prefix}.up_proj", inter, h)
        linear(f"{prefix}.down_proj", h, inter)

    out["model.embed_tokens.weight"] = (c["vocab"], h)
    for layer in range(c["layers"] + mtp):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        linear(f"{p}.self_attn.q_a_proj", c["q_lora"], h)
        out[f"{p}.self_attn.q_a_layernorm.weight"] = (c["q_lora"],)
        linear(f"{p}.self_attn.q_b_proj", c["heads"] * c["qk_head"], c["q_lora"])
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", c["kv_lora"] + c["rope"], h)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = (c["kv_lora"],)
        linear(f"{p}.self_attn.kv_b_proj", c["heads"] * (c["qk_head"] - c["rope"] + c["v_head"]), c["kv_lora"])
        linear(f"{p}.self_attn.o_proj", h, c["heads"] * c["v_head"])
        if layer < c["dense"]:
            mlp(f"{p}.mlp", c["dense_inter"])
        else:
            out[f"{p}.mlp.gate.weight"] = (c["experts"], h)
            out[f"{p}.mlp.gate.e_score_correction_bias"] = (c["experts"],)
            for e in range(c["experts"]):
                mlp(f"{p}.mlp.experts.{e}", c["moe_inter"])
            mlp(f"{p}.mlp.shared_experts", c["moe_inter"])
        if layer >= c["layers"]:
            out[f"{p}.embed_tokens.weight"] = (c["vocab"], h)
            out[f"{p}.enorm.weight"] = (h,)
            out[f"{p}.hnorm.weight"] = (h,)
            linear(f"{p}.eh_proj", h, 2 * h, quantized=False)
            out[f"{p}.shared_head.norm.weight"] = (h,)
            out[f"{p}.shared_head.head.weight"] = (c["vocab"], h)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (c["vocab"], h)
    return out


def canonical_for(mapping: str, shapes: dict) -> dict:
    # Megatron shares the MTP layer's embedding and output head with the main model
    if mapping != "megatron":
        return dict(shapes)
    return {k: v for k, v in shapes.items() if not k.endswith((".embed_tokens.weight", "shared_head.head.weight"))
            or k == "model.embed_tokens.weight"}


@pytest.fixture(scope="module", params=[False, True], ids=["bf16", "fp8"])
def full_model(request):
    return request.param, model_shapes(V3, fp8=request.param)


def test_full_model_name_count(full_model):
    fp8, shapes = full_model
    # 3 globals + 3 dense layers x 12 + 58 MoE layers x 782 + MTP 788; FP8 adds 8, 776 and 776 scales
    assert len(shapes) == (91_991 if fp8 else 46_183)


# torchtitan stacks its routed experts (read only: plan_to_source does not stack) and has no FP8
# scales: test_torchtitan_full_model plans it from names its state_dict_adapter would write
WRITABLE = [n for n in BUILTIN if n != "torchtitan"]


@pytest.mark.parametrize("name", WRITABLE)
def test_round_trip_full_model(name, full_model):
    fp8, shapes = full_model
    mapping, canonical = load_mapping(name), canonical_for(name, shapes)
    to_source = mapping.plan_to_source(canonical, LAYERS)
    source_shapes = {s: derived_shape(d, canonical) for s, d in to_source.items()}

    start = time.perf_counter()
    plan = mapping.plan(source_shapes, LAYERS)
    elapsed = time.perf_counter() - start

    # Megatron's plan writes the MTP embedding and head it does not store from the main model's
    assert {t: derived_shape(d, source_shapes) for t, d in plan.items()} == shapes
    assert {t for t, d in plan.items() if d.shared} == set(shapes) - set(canonical)
    assert mapping.inverse(plan) == to_source
    assert elapsed < 5.0, f"plan() took {elapsed:.2f}s on {len(source_shapes)} names"
    fused = sum(1 for d in to_source.values() if d.op == "fuse")
    if name == "hf":
        assert all(d.op == "rename" and d.sources == (s,) for s, d in to_source.items())
    else:
        assert not set(source_shapes) & set(canonical)  # every name really is renamed
    if name == "megatron":  # gate+up pairs: 3 dense layers, 58 MoE layers + MTP layer with 257 experts
        assert fused == (3 + 59 * 257) * (2 if fp8 else 1)
    else:
        assert fused == 0


EXPECTED = {
    "megatron": {
        # source: [(target, op, split index)]
        "decoder.layers.5.mlp.experts.linear_fc1.weight7": [
            ("model.layers.5.mlp.experts.7.gate_proj.weight", "split", 0),
            ("model.layers.5.mlp.experts.7.up_proj.weight", "split", 1)],
        "decoder.layers.5.mlp.experts.linear_fc1.weight_scale_inv7": [
            ("model.layers.5.mlp.experts.7.gate_proj.weight_scale_inv", "split", 0),
            ("model.layers.5.mlp.experts.7.up_proj.weight_scale_inv", "split", 1)],
        "decoder.layers.0.mlp.linear_fc1.weight": [
            ("model.layers.0.mlp.gate_proj.weight", "split", 0), ("model.layers.0.mlp.up_proj.weight", "split", 1)],
        "decoder.layers.4.mlp.shared_experts.linear_fc1.weight": [
            ("model.layers.4.mlp.shared_experts.gate_proj.weight", "split", 0),
            ("model.layers.4.mlp.shared_experts.up_proj.weight", "split", 1)],
        "decoder.layers.3.mlp.shared_experts.linear_fc2.weight": [
            ("model.layers.3.mlp.shared_experts.down_proj.weight", "rename", 0)],
        "module.module.decoder.layers.0.self_attention.linear_q_down_proj.weight": [
            ("model.layers.0.self_attn.q_a_proj.weight", "rename", 0)],
        "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight": [
            ("model.layers.0.self_attn.q_a_layernorm.weight", "rename", 0)],
        "decoder.layers.0.self_attention.linear_kv_up_proj.weight": [
            ("model.layers.0.self_attn.kv_b_proj.weight", "rename", 0)],
        "decoder.layers.0.self_attention.linear_proj.weight": [("model.layers.0.self_attn.o_proj.weight", "rename", 0)],
        "decoder.layers.3.mlp.router.weight": [("model.layers.3.mlp.gate.weight", "rename", 0)],
        "decoder.layers.3.mlp.router.expert_bias": [("model.layers.3.mlp.gate.e_score_correction_bias", "rename", 0)],
        "decoder.layers.7.self_attention.linear_qkv.layer_norm_weight": [
            ("model.layers.7.input_layernorm.weight", "rename", 0)],
        "decoder.layers.7.mlp.linear_fc1.layer_norm_weight": [
            ("model.layers.7.post_attention_layernorm.weight", "rename", 0)],
        "decoder.layers.8.pre_mlp_layernorm.weight": [("model.layers.8.post_attention_layernorm.weight", "rename", 0)],
        "mtp.layers.0.final_layernorm.weight": [("model.layers.61.shared_head.norm.weight", "rename", 0)],
        "mtp.layers.0.eh_proj.weight": [("model.layers.61.eh_proj.weight", "rename", 0)],
        "mtp.layers.0.transformer_layer.mlp.experts.linear_fc2.weight255": [
            ("model.layers.61.mlp.experts.255.down_proj.weight", "rename", 0)],
        "embedding.word_embeddings.weight": [("model.embed_tokens.weight", "rename", 0)],
        "output_layer.weight": [("lm_head.weight", "rename", 0)],
        "decoder.final_layernorm.weight": [("model.norm.weight", "rename", 0)],
        "decoder.layers.7.self_attention.linear_proj._extra_state": [],
    },
    "deepseek": {
        "layers.3.ffn.experts.7.w3.weight": [("model.layers.3.mlp.experts.7.up_proj.weight", "rename", 0)],
        "layers.3.ffn.experts.7.w3.scale": [("model.layers.3.mlp.experts.7.up_proj.weight_scale_inv", "rename", 0)],
        "layers.2.ffn.w1.weight": [("model.layers.2.mlp.gate_proj.weight", "rename", 0)],
        "layers.2.ffn.w2.weight": [("model.layers.2.mlp.down_proj.weight", "rename", 0)],
        "layers.0.attn.wq_a.weight": [("model.layers.0.self_attn.q_a_proj.weight", "rename", 0)],
        "layers.0.attn.q_norm.weight": [("model.layers.0.self_attn.q_a_layernorm.weight", "rename", 0)],
        "layers.0.attn.wkv_a.weight": [("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "rename", 0)],
        "layers.0.attn.kv_norm.weight": [("model.layers.0.self_attn.kv_a_layernorm.weight", "rename", 0)],
        "layers.0.attn.wo.weight": [("model.layers.0.self_attn.o_proj.weight", "rename", 0)],
        "layers.0.attn_norm.weight": [("model.layers.0.input_layernorm.weight", "rename", 0)],
        "layers.0.ffn_norm.weight": [("model.layers.0.post_attention_layernorm.weight", "rename", 0)],
        "layers.4.ffn.gate.weight": [("model.layers.4.mlp.gate.weight", "rename", 0)],
        "layers.4.ffn.gate.bias": [("model.layers.4.mlp.gate.e_score_correction_bias", "rename", 0)],
        "layers.4.ffn.shared_experts.w3.weight": [("model.layers.4.mlp.shared_experts.up_proj.weight", "rename", 0)],
        "layers.61.eh_proj.weight": [("model.layers.61.eh_proj.weight", "rename", 0)],
        "layers.61.embed.weight": [("model.layers.61.embed_tokens.weight", "rename", 0)],
        "embed.weight": [("model.embed_tokens.weight", "rename", 0)],
        "head.weight": [("lm_head.weight", "rename", 0)],
        "norm.weight": [("model.norm.weight", "rename", 0)],
    },
    "torchtitan": {
        "layers.0.attention_norm.weight": [("model.layers.0.input_layernorm.weight", "rename", 0)],
        "layers.0.attention.wq_a.weight": [("model.layers.0.self_attn.q_a_proj.weight", "rename", 0)],
        "layers.0.attention.q_norm.weight": [("model.layers.0.self_attn.q_a_layernorm.weight", "rename", 0)],
        "layers.0.attention.wq_b.weight": [("model.layers.0.self_attn.q_b_proj.weight", "rename", 0)],
        "layers.0.attention.wkv_a.weight": [("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "rename", 0)],
        "layers.0.attention.kv_norm.weight": [("model.layers.0.self_attn.kv_a_layernorm.weight", "rename", 0)],
        "layers.0.attention.wkv_b.weight": [("model.layers.0.self_attn.kv_b_proj.weight", "rename", 0)],
        "layers.0.attention.wo.weight": [("model.layers.0.self_attn.o_proj.weight", "rename", 0)],
        "layers.1.attention.wq.weight": [("model.layers.1.self_attn.q_proj.weight", "rename", 0)],
        "layers.0.ffn_norm.weight": [("model.layers.0.post_attention_layernorm.weight", "rename", 0)],
        "layers.0.feed_forward.w1.weight": [("model.layers.0.mlp.gate_proj.weight", "rename", 0)],
        "layers.0.feed_forward.w3.weight": [("model.layers.0.mlp.up_proj.weight", "rename", 0)],
        "layers.0.feed_forward.w2.weight": [("model.layers.0.mlp.down_proj.weight", "rename", 0)],
        "layers.4.moe.router.gate.weight": [("model.layers.4.mlp.gate.weight", "rename", 0)],
        "layers.4.moe.expert_bias_E": [("model.layers.4.mlp.gate.e_score_correction_bias", "rename", 0)],
        "layers.5.moe.expert_bias": [("model.layers.5.mlp.gate.e_score_correction_bias", "rename", 0)],
        "layers.4.moe.shared_experts.w1.weight": [("model.layers.4.mlp.shared_experts.gate_proj.weight", "rename", 0)],
        "layers.4.moe.shared_experts.w3.weight": [("model.layers.4.mlp.shared_experts.up_proj.weight", "rename", 0)],
        "layers.4.moe.shared_experts.w2.weight": [("model.layers.4.mlp.shared_experts.down_proj.weight", "rename", 0)],
        "mtp_layers.0.attention.wo.weight": [("model.layers.61.self_attn.o_proj.weight", "rename", 0)],
        "mtp_layers.0.hnorm.weight": [("model.layers.61.hnorm.weight", "rename", 0)],
        "mtp_layers.0.eh_proj.weight": [("model.layers.61.eh_proj.weight", "rename", 0)],
        "mtp_layers.0.mtp_norm.weight": [("model.layers.61.shared_head.norm.weight", "rename", 0)],
        "tok_embeddings.weight": [("model.embed_tokens.weight", "rename", 0)],
        "lm_head.weight": [("lm_head.weight", "rename", 0)],
        "norm.weight": [("model.norm.weight", "rename", 0)],
        "layers.0.attention.rope.freqs_cis": [],
    },
    "hf": {
        "model.layers.61.shared_head.head.weight": [("model.layers.61.shared_head.head.weight", "rename", 0)],
        "model.layers.3.mlp.experts.9.down_proj.weight_scale_inv": [
            ("model.layers.3.mlp.experts.9.down_proj.weight_scale_inv", "rename", 0)],
        "model.layers.3.mlp.experts.9.down_proj.weight": [
            ("model.layers.3.mlp.experts.9.down_proj.weight", "rename", 0)],
        "model.layers.0.self_attn.rotary_emb.inv_freq": [],
    },
}


@pytest.mark.parametrize("name", BUILTIN)
def test_hand_written_pairs(name):
    shapes = {s: (4096, 7168) if "scale" not in s else (32, 56) for s in EXPECTED[name]}
    plan = load_mapping(name).plan(shapes, LAYERS)
    want = {t: (s, op, i) for s, targets in EXPECTED[name].items() for t, op, i in targets}
    assert {t: (d.sources[0], d.op, d.index) for t, d in plan.items()} == want


@pytest.mark.parametrize("older", [False, True])
def test_torchtitan_full_model(full_model, older):
    """The full DeepSeek V3 under the names torchtitan's state_dict_adapter gives it (experts
    stacked: today's `routed_experts.inner_experts.w1_EFD`, or the older `moe.experts.w1` and
    `moe.expert_bias`) plans back to every canonical tensor, the MTP copies of the embedding and
    head from the main ones; the names are detected as torchtitan's."""
    from converter.models.dcp_demo import torchtitan_tensors

    fp8, shapes = full_model
    if fp8:
        pytest.skip("torchtitan checkpoints hold no FP8 scales")
    hf = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    config = {"num_hidden_layers": LAYERS, "n_routed_experts": 256}
    source = {n: tuple(t.shape) for n, t in torchtitan_tensors(hf, config)}
    if older:
        old = {"routed_experts.inner_experts.w1_EFD": "experts.w1", "routed_experts.inner_experts.w3_EFD": "experts.w3",
               "routed_experts.inner_experts.w2_EDF": "experts.w2", "expert_bias_E": "expert_bias"}
        source = {re.sub("|".join(map(re.escape, old)), lambda m: old[m[0]], n): s for n, s in source.items()}
    assert "layers.3.moe.routed_experts.inner_experts.w2_EDF" in source or older
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in source)
    plan = load_mapping("torchtitan").plan(source, LAYERS)
    assert {t: derived_shape(d, source) for t, d in plan.items()} == shapes
    assert {t for t, d in plan.items() if d.shared} == {f"model.layers.{LAYERS}.embed_tokens.weight",
                                                        f"model.layers.{LAYERS}.shared_head.head.weight"}
    assert detect_mapping(source) == "torchtitan"


def test_materialize_split_gives_gate_then_up():
    gate, up = torch.randn(256, 64).bfloat16(), torch.randn(256, 64).bfloat16()
    gate_s, up_s = torch.rand(2, 1) + 1, torch.rand(2, 1) + 3
    fc1 = "decoder.layers.3.mlp.experts.linear_fc1.weight5"
    fc1_scale = "decoder.layers.3.mlp.experts.linear_fc1.weight_scale_inv5"
    tensors = {fc1: torch.cat([gate, up]).to(torch.float8_e4m3fn), fc1_scale: torch.cat([gate_s, up_s])}
    mapping = load_mapping("megatron")
    plan = mapping.plan({k: tuple(v.shape) for k, v in tensors.items()}, LAYERS)

    e = "model.layers.3.mlp.experts.5"
    out = {t: materialize(d, tensors.__getitem__) for t, d in plan.items()}
    assert set(out) == {f"{e}.{p}_proj.{w}" for p in ("gate", "up") for w in ("weight", "weight_scale_inv")}
    assert torch.equal(out[f"{e}.gate_proj.weight"].view(torch.uint8), gate.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(out[f"{e}.up_proj.weight"].view(torch.uint8), up.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(out[f"{e}.gate_proj.weight_scale_inv"], gate_s)
    assert torch.equal(out[f"{e}.up_proj.weight_scale_inv"], up_s)
    assert all(t.is_contiguous() for t in out.values())

    back = {s: materialize(d, out.__getitem__) for s, d in mapping.inverse(plan).items()}  # fuse undoes split
    assert torch.equal(back[fc1].view(torch.uint8), tensors[fc1].view(torch.uint8))
    assert torch.equal(back[fc1_scale], tensors[fc1_scale])


def test_materialize_split_along_dim1_is_contiguous():
    t = torch.arange(24.0).reshape(2, 12)
    d = Derivation("x", ("src",), "split", dim=1, index=2, parts=3)
    out = materialize(d, {"src": t}.__getitem__)
    assert out.is_contiguous() and torch.equal(out, torch.tensor([[8.0, 9, 10, 11], [20, 21, 22, 23]]))
    assert derived_shape(d, {"src": (2, 12)}) == (2, 4)


def test_user_fuse_rule_and_its_inverse(tmp_path):
    path = tmp_path / "columns.yaml"
    path.write_text("rules:\n"
                    "  - sources: ['blk.{L}.out_left', 'blk.{L}.out_right']\n"
                    "    target: 'model.layers.{L}.self_attn.o_proj.weight'\n"
                    "    dim: 1\n")
    left, right = torch.randn(8, 4), torch.randn(8, 4)
    tensors = {"blk.2.out_left": left, "blk.2.out_right": right}
    mapping = load_mapping(str(path))
    plan = mapping.plan({k: tuple(v.shape) for k, v in tensors.items()}, LAYERS)
    assert list(plan) == ["model.layers.2.self_attn.o_proj.weight"]
    o_proj = "model.layers.2.self_attn.o_proj.weight"
    fused = materialize(plan[o_proj], tensors.__getitem__)
    assert torch.equal(fused, torch.cat([left, right], dim=1))
    inverse = mapping.inverse(plan)
    assert inverse["blk.2.out_right"] == Derivation("blk.2.out_right", (o_proj,), "split", dim=1, index=1, parts=2)
    assert torch.equal(materialize(inverse["blk.2.out_right"], {o_proj: fused}.__getitem__), right)
    with pytest.raises(MappingError, match=r"blk\.2\.out_right .*partner of blk\.2\.out_left"):
        mapping.plan({"blk.2.out_left": (8, 4)}, LAYERS)
    with pytest.raises(MappingError, match="differ in shape"):
        mapping.plan({"blk.2.out_left": (8, 4), "blk.2.out_right": (8, 5)}, LAYERS)


@pytest.mark.parametrize("name", ["megatron", "deepseek"])
@pytest.mark.parametrize("fp8", [False, True])
def test_tensor_round_trip_tiny_model(name, fp8):
    torch.manual_seed(0)
    shapes = canonical_for(name, model_shapes(TINY, fp8=fp8))
    canonical = {k: torch.randn(v) for k, v in shapes.items()}
    mapping = load_mapping(name)
    to_source = mapping.plan_to_source(shapes, TINY["layers"])
    source = {s: materialize(d, canonical.__getitem__) for s, d in to_source.items()}
    plan = mapping.plan({k: tuple(v.shape) for k, v in source.items()}, TINY["layers"])
    assert {t for t, d in plan.items() if not d.shared} == set(canonical)
    for target, d in plan.items():
        main = "model.embed_tokens.weight" if target.endswith("embed_tokens.weight") else "lm_head.weight"
        want = canonical[main if d.shared else target]
        assert torch.equal(materialize(d, source.__getitem__), want), target


# --- errors -----------------------------------------------------------------------------------

def test_unmatched_names_are_reported_with_count():
    good = {"model.layers.0.self_attn.q_a_proj.weight": (1536, 7168)}
    typos = {f"model.layers.{i}.self_attn.q_a_prj.weight": (1536, 7168) for i in range(8)}
    with pytest.raises(MappingError) as err:
        load_mapping("hf").plan({**good, **typos}, LAYERS)
    msg = str(err.value)
    assert "8 tensors match no rule" in msg and "model.layers.0.self_attn.q_a_prj.weight" in msg
    assert "model.layers.7.self_attn.q_a_prj.weight" not in msg and "..." in msg  # first few only
    assert "hf.yaml" in msg


@pytest.mark.parametrize("name,bad", [
    ("hf", "model.layers.5.enorm.weight"),               # MTP-only tensor on a decoder layer
    ("hf", "model.layers.0.mlp.experts.01.gate_proj.weight"),  # leading zero: not a name we could write back
    ("megatron", "decoder.layers.61.input_layernorm.weight"),  # beyond num_hidden_layers
    ("deepseek", "layers.0.attn.wq_a.weight_scale_inv"),
])
def test_names_outside_the_mapping_are_rejected(name, bad):
    with pytest.raises(MappingError, match=r"1 tensor matches no rule: " + bad.replace(".", r"\.")):
        load_mapping(name).plan({bad: (7168,)}, LAYERS)


def test_two_sources_for_one_target():
    shapes = {"decoder.layers.0.input_layernorm.weight": (8,),
              "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (8,)}
    with pytest.raises(MappingError, match=r"1 target produced twice: model\.layers\.0\.input_layernorm\.weight "
                                           r"\(from decoder\.layers\.0\.input_layernorm\.weight and from "
                                           r"decoder\.layers\.0\.self_attention\.linear_qkv\.layer_norm_weight\)"):
        load_mapping("megatron").plan(shapes, LAYERS)


def test_two_rules_for_one_target_in_a_user_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("rules:\n  - {source: a.weight, target: model.norm.weight}\n"
                    "  - {source: b.weight, target: model.norm.weight, alternative: true}\n")
    with pytest.raises(MappingError,
                       match=r"1 target produced twice: model\.norm\.weight \(from a\.weight and from b\.weight\)"):
        load_mapping(str(path)).plan({"a.weight": (4,), "b.weight": (4,)}, LAYERS)
    path.write_text("rules:\n  - {source: a.weight, target: model.norm.weight}\n"
                    "  - {source: b.weight, target: model.norm.weight}\n")
    with pytest.raises(MappingError, match=r"duplicate rules: rule 1 and rule 2 both target 'model\.norm\.weight'"):
        load_mapping(str(path))


def test_name_matching_two_rules_is_ambiguous(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("rules:\n  - {source: 'x.{L}.weight', target: 'model.layers.{L}.input_layernorm.weight'}\n"
                    "  - {op: skip, source: 'x.{*}'}\n")
    with pytest.raises(MappingError, match=r"1 tensor matches several rules: x\.3\.weight \(rule 1 and rule 2\)"):
        load_mapping(str(path)).plan({"x.3.weight": (4,), "x.extra": (1,)}, LAYERS)


@pytest.mark.parametrize("text,message", [
    ("rules: [ {source: x", "not valid YAML"),
    ("- just a list", "must be a YAML mapping"),
    ("rulez: []", r"unknown key\(s\) \['rulez'\]"),
    ("rules:\n  - {source: a.weight, targt: model.norm.weight}", r"rule 1: unknown key\(s\) \['targt'\]"),
    ("rules:\n  - {op: merge, source: a.weight}", "rule 1: bad op 'merge'"),
    ("rules:\n  - {source: a.weight, target: 'model.layers.{L}.input_layernorm.weight'}",
     r"placeholder\(s\) \['L'\] used in target but not in source 'a\.weight'"),
    ("rules:\n  - {source: 'a.{L}.weight', target: model.norm.weight}",
     r"\['L'\] of 'a\.\{L\}\.weight' missing from the target"),
    ("rules:\n  - {source: 'a.{L}.w'}\n  - {source: 'a.{M}.w'}",
     "duplicate rules: rule 1 and rule 2 both source 'a.{M}.w'"),
    ("rules:\n  - {source: a.w, targets: [b.w]}", "a split rule needs one source and 2 or more targets"),
    ("rules:\n  - {source: 'a.{L + i}.w'}", "needs exactly one placeholder, added"),
    ("rules:\n  - {source: 'a.{num_hidden_layers - i}.w'}", "needs exactly one placeholder, added"),
    ("rules:\n  - {source: 'a.{_x}.w'}", "expected `name`"),
    ("rules:\n  - {source: 'a.{L}.{L}.w'}", "placeholder {L} used twice"),
    ("rules:\n  - {source: 'a.{*}.w'}", r"\{\*\} is only allowed in skip rules"),
    ("rules:\n  - {source: a.norm, scaled: true}", "`scaled` needs sources with a `weight` part"),
    ("rules:\n  - {include: nope, source: 'a.'}", "no ruleset 'nope'"),
    ("detect: ['(']\nrules:\n  - {source: a.w}", "bad `detect` pattern"),
    ("limits: {L: {above: 3}}\nrules:\n  - {source: a.w}", "`limits` must map"),
])
def test_malformed_mapping_files(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(MappingError, match=message) as err:
        load_mapping(str(path))
    assert str(path) in str(err.value)


def test_unknown_mapping_name():
    with pytest.raises(MappingError, match="no mapping 'nemo'"):
        load_mapping("nemo")


def test_split_scale_must_fall_on_block_boundaries():
    shapes = {"decoder.layers.3.mlp.experts.linear_fc1.weight0": (2 * 192, 7168),
              "decoder.layers.3.mlp.experts.linear_fc1.weight_scale_inv0": (3, 56)}
    with pytest.raises(MappingError, match=r"linear_fc1\.weight_scale_inv0: split of FP8 scale needs parts of "
                                           r"weight decoder\.layers\.3\.mlp\.experts\.linear_fc1\.weight0 \[384, 7168\]"):
        load_mapping("megatron").plan(shapes, LAYERS)
    # the same weight without a scale splits fine (192 rows each)
    plan = load_mapping("megatron").plan({k: v for k, v in shapes.items() if "scale" not in k}, LAYERS)
    assert derived_shape(plan["model.layers.3.mlp.experts.0.up_proj.weight"], shapes) == (192, 7168)


def test_scale_without_weight_and_odd_split():
    with pytest.raises(MappingError,
                       match=r"layers\.0\.attn\.wo\.scale is an FP8 scale without its weight layers\.0\.attn\.wo\.weight"):
        load_mapping("deepseek").plan({"layers.0.attn.wo.scale": (56, 128)}, LAYERS)
    with pytest.raises(MappingError, match=r"does not split into 2 equal parts along dim 0"):
        load_mapping("megatron").plan({"decoder.layers.0.mlp.linear_fc1.weight": (5, 7)}, LAYERS)


def test_inverse_needs_every_split_part():
    mapping = load_mapping("megatron")
    plan = mapping.plan({"decoder.layers.0.mlp.linear_fc1.weight": (8, 4)}, LAYERS)
    del plan["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(MappingError, match=r"split into 2 parts but the plan has parts \[0\]"):
        mapping.inverse(plan)


def test_megatron_mtp_lacks_embed_and_head():
    shapes = {"model.layers.61.embed_tokens.weight": (8, 4), "model.layers.61.shared_head.head.weight": (8, 4)}
    with pytest.raises(MappingError, match=r"2 tensors match no rule: model\.layers\.61\.embed_tokens\.weight"):
        load_mapping("megatron").plan_to_source(shapes, LAYERS)


def test_bad_derivation():
    with pytest.raises(MappingError, match="bad derivation rename of 2"):
        Derivation("x", ("a", "b"), "rename")
    with pytest.raises(MappingError, match="bad derivation concat"):
        Derivation("x", ("a",), "concat")


def test_loading_a_user_file_leaves_builtins_alone(tmp_path):
    path = tmp_path / "hf.yaml"
    path.write_text("rules:\n  - {source: model.layers.0.extra.weight}\n")
    assert list(load_mapping(str(path)).plan({"model.layers.0.extra.weight": (1,)}, LAYERS))
    with pytest.raises(MappingError, match="1 tensor matches no rule"):
        load_mapping("hf").plan({"model.layers.0.extra.weight": (1,)}, LAYERS)


# --- detection --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WRITABLE)
def test_detect_each_naming(name):
    shapes = canonical_for(name, model_shapes(TINY, fp8=True))
    names = list(load_mapping(name).plan_to_source(shapes, TINY["layers"]))
    assert detect_mapping(names) == name
    assert detect_mapping(iter(names)) == name  # any iterable


def test_detect_megatron_with_wrapper_prefix():
    assert detect_mapping(["module.module.decoder.layers.0.input_layernorm.weight"]) == "megatron"
    assert detect_mapping(["module.embedding.word_embeddings.weight"]) == "megatron"


@pytest.mark.parametrize("names,message", [
    (["transformer.h.0.attn.c_attn.weight", "wte.weight"], "cannot tell the naming of 2 tensors"),
    ([], "cannot tell the naming of 0 tensors"),
    (["model.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.weight"],
     r"several namings \(hf, megatron\)"),
])
def test_detect_fails_clearly(names, message):
    with pytest.raises(MappingError, match=message):
        detect_mapping(names)
