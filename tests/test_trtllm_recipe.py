"""The FlashInfer TRT-LLM pre-shuffled expert layout as a conversion target, and `unshuffle`.

The layout semantics are checked with index formulas written here from SPEC section 4, not
with converter.numerics.trtllm_layout (whose own tests compare it with FlashInfer's helpers)."""

import numpy as np
import pytest
import torch
from helpers import load_all, read_json, same_bytes

import converter
from converter.numerics.dispatch import dequantize_mxfp8
from converter.run.unshuffle import unshuffle

CFG_LAYERS = range(1, 4)  # tiny model: MoE layers 1, 2 and the MTP layer 3
EXPERTS = range(4)


def spec_shuffle(m):
    return torch.tensor([(p // 32) * 32 + (p % 8) * 4 + (p % 32) // 8 for p in range(m)])


def spec_w13_rows(i):
    interleave = torch.tensor([j // 2 if j % 2 == 0 else i + j // 2 for j in range(2 * i)])
    return interleave[spec_shuffle(2 * i)]


def spec_unswizzle(s):
    r, c = s.shape
    flat = s.reshape(-1)
    out = torch.empty_like(s)
    for row in range(r):
        for col in range(c):
            off = ((row // 128) * (c // 4) + col // 4) * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + col % 4
            out[row, col] = flat[off]
    return out


@pytest.fixture(scope="module")
def conversions(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    out = {}
    for kind in ("bf16", "fp8", "fp8_ue8m0"):
        canonical, shuffled = root / f"{kind}-canonical", root / f"{kind}-trtllm"
        converter.convert(tiny_sources[kind], canonical, quiet=True)
        converter.convert(tiny_sources[kind], shuffled, recipe="deepseek_v3_mxfp8_trtllm", quiet=True,
                          max_shard_size="1MB")
        out[kind] = (canonical, shuffled)
    return out


def test_layout_recorded_and_only_routed_experts_packed(conversions):
    canonical, shuffled = conversions["bf16"]
    qc = read_json(shuffled / "config.json")["quantization_config"]
    assert qc["moe_weight_layout"]["format"] == "flashinfer_trtllm_gen"
    assert qc["moe_weight_layout"]["valid_for"] == "expert_parallel"
    out = load_all(shuffled)
    for layer in CFG_LAYERS:
        for e in EXPERTS:
            p = f"model.layers.{layer}.mlp.experts.{e}."
            assert out[p + "w13_weight"].dtype == torch.float8_e4m3fn and out[p + "w13_weight"].shape == (256, 256)
            assert out[p + "w13_weight_scale_inv"].dtype == torch.uint8
            assert out[p + "w2_weight"].shape == (256, 128) and out[p + "w2_weight_scale_inv"].shape == (256, 4)
            assert p + "gate_proj.weight" not in out
        assert f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight" in out
    canon = load_all(canonical)
    shared = [n for n in canon if "experts." not in n or "shared_experts" in n]
    assert all(same_bytes(out[n], canon[n]) for n in shared)


@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_ue8m0"])
def test_packed_experts_follow_the_spec_layout(conversions, kind):
    canonical, shuffled = conversions[kind]
    canon, out = load_all(canonical), load_all(shuffled)
    rows13, rows2 = spec_w13_rows(128), spec_shuffle(256)
    for layer in CFG_LAYERS:
        for e in EXPERTS:
            p = f"model.layers.{layer}.mlp.experts.{e}."
            up_gate = torch.cat([canon[p + "up_proj.weight"].view(torch.uint8), canon[p + "gate_proj.weight"].view(torch.uint8)])
            up_gate_s = torch.cat([canon[p + "up_proj.weight_scale_inv"], canon[p + "gate_proj.weight_scale_inv"]])
            assert torch.equal(out[p + "w13_weight"].view(torch.uint8), up_gate[rows13])
            assert torch.equal(spec_unswizzle(out[p + "w13_weight_scale_inv"]), up_gate_s[rows13])
            assert torch.equal(out[p + "w2_weight"].view(torch.uint8), canon[p + "down_proj.weight"].view(torch.uint8)[rows2])
            assert torch.equal(spec_unswizzle(out[p + "w2_weight_scale_inv"]), canon[p + "down_proj.weight_scale_inv"][rows2])


@pytest.mark.parametrize("kind, processes", [("bf16", "1"), ("fp8_ue8m0", "1"), ("bf16", "3")])
def test_unshuffle_restores_the_canonical_checkpoint(conversions, tmp_path, kind, processes, monkeypatch):
    """(In 3 conversion processes too: the packed source's view is sent to each of them.)"""
    monkeypatch.setenv("MXCONV_PROCESSES", processes)
    canonical, shuffled = conversions[kind]
    restored = tmp_path / "restored"
    result = unshuffle(shuffled, restored, quiet=True, max_shard_size="300KB", workers=3)
    assert len(result.plan.shards) >= 3 and result.processes == int(processes)
    a, b = load_all(canonical), load_all(restored)
    assert a.keys() == b.keys()
    assert all(same_bytes(a[n], b[n]) for n in a)
    assert read_json(restored / "config.json") == read_json(canonical / "config.json")
    recipe = read_json(restored / "mxconv.json")["recipe"]
    assert recipe.pop("name") == "deepseek_v3_mxfp8_trtllm (unshuffled)"  # what it was converted with ...
    want = read_json(canonical / "mxconv.json")["recipe"]
    want.pop("name")
    assert recipe == want  # ... and in every other respect the canonical recipe
    prov = read_json(restored / "mxconv.json")
    assert prov["source"] == read_json(shuffled / "mxconv.json")["source"]  # the original source stays
    assert prov["derived_from"]["path"] == str(shuffled.resolve())


def test_unshuffled_checkpoint_verifies_against_the_original_source(tiny_sources, conversions, tmp_path):
    from converter.verify.runner import verify_checkpoint

    restored = tmp_path / "restored"
    unshuffle(conversions["bf16"][1], restored, quiet=True)
    report = verify_checkpoint(tiny_sources["bf16"], restored, quiet=True)
    assert report.passed, [f.message for f in report.failures]


@pytest.mark.parametrize("text, message", [("{bad", "unreadable"), ("{}", "not marked complete"),
                                           ('{"complete": false}', "not marked complete"),
                                           ('{"complete": true}', "lacks its recipe")])
def test_unshuffle_refuses_a_bad_provenance_file(conversions, tmp_path, text, message):
    import shutil

    from converter.errors import SourceError

    src = tmp_path / "src"
    shutil.copytree(conversions["bf16"][1], src)
    (src / "mxconv.json").write_text(text)
    with pytest.raises(SourceError, match=message):
        unshuffle(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_unshuffle_refuses_a_canonical_checkpoint(conversions, tmp_path):
    from converter.errors import SourceError

    with pytest.raises(SourceError, match="not a pre-shuffled checkpoint"):
        unshuffle(conversions["bf16"][0], tmp_path / "x", quiet=True)


def _integers(*tensors: torch.Tensor) -> list[np.ndarray]:
    """The tensors times one common power of two that makes every value an integer (MXFP8 values
    have 4 significant bits), as arrays of Python ints: exact arithmetic, no rounding anywhere."""
    nonzero = torch.cat([t[t != 0].abs().reshape(-1) for t in tensors])
    shift = int((3 - torch.frexp(nonzero).exponent).max()) + 1
    return [np.array([[int(v) for v in row] for row in torch.ldexp(t, torch.tensor(float(shift))).tolist()],
                     dtype=object) for t in tensors]


def test_moe_forward_from_the_packed_layout_equals_canonical(conversions):
    """A gated expert MLP computed straight from the packed tensors (undoing the row order on the
    outputs, as the kernel's epilogue does) equals the canonical checkpoint's exactly. The
    arithmetic is exact (Python integers: the weights scaled by a common power of two, a ReLU
    gate), so the comparison cannot depend on a BLAS's summation order or the CPU."""
    canonical, shuffled = conversions["bf16"]
    canon, out = load_all(canonical), load_all(shuffled)
    x = np.array(torch.randint(-3, 4, (4, 256), generator=torch.Generator().manual_seed(0)).tolist(), dtype=object)
    inv13, inv2 = torch.argsort(spec_w13_rows(128)).numpy(), torch.argsort(spec_shuffle(256)).numpy()
    for layer in CFG_LAYERS:
        for e in EXPERTS:
            p = f"model.layers.{layer}.mlp.experts.{e}."

            def deq(name):
                return dequantize_mxfp8(canon[name + ".weight"], canon[name + ".weight_scale_inv"]).double()

            w13 = dequantize_mxfp8(out[p + "w13_weight"], spec_unswizzle(out[p + "w13_weight_scale_inv"])).double()
            w2 = dequantize_mxfp8(out[p + "w2_weight"], spec_unswizzle(out[p + "w2_weight_scale_inv"])).double()
            gate, up, w13 = _integers(deq(p + "gate_proj"), deq(p + "up_proj"), w13)
            down, w2 = _integers(deq(p + "down_proj"), w2)
            relu = np.vectorize(lambda v: max(v, 0), otypes=[object])
            want = (relu(x @ gate.T) * (x @ up.T)) @ down.T
            h = (x @ w13.T)[:, inv13]  # -> [up | gate] columns
            got = (relu(h[:, 128:]) * h[:, :128]) @ w2[inv2].T
            assert (got == want).all(), p


@pytest.mark.cuda
def test_trtllm_conversion_on_cuda_is_byte_identical(tiny_sources, conversions, tmp_path):
    _, shuffled = conversions["bf16"]
    gpu = tmp_path / "gpu"
    converter.convert(tiny_sources["bf16"], gpu, recipe="deepseek_v3_mxfp8_trtllm", device="cuda", quiet=True,
                      max_shard_size="1MB")
    for path in shuffled.glob("*.safetensors"):
        assert (gpu / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp8_ue8m0"])
def test_packed_experts_cut_into_row_pieces_are_byte_identical(tmp_path, monkeypatch, precision):
    """Big experts are converted in 128-row bands (w13 bands land at twice the source row); the
    result must not depend on where the bands are cut."""
    from converter.models.demo import TINY_CONFIG, build_checkpoint
    from converter.run import execute, pieces

    config = dict(TINY_CONFIG, moe_intermediate_size=512, n_routed_experts=2, num_hidden_layers=2)
    src = build_checkpoint(tmp_path / "src", config, precision=precision, seed=7)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    converter.convert(src, whole, recipe="deepseek_v3_mxfp8_trtllm", quiet=True, workers=1)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 40_000)  # 512-row experts -> 128-row bands
    job_cuts = []
    real_split = pieces.split
    monkeypatch.setattr(execute, "split", lambda *a: job_cuts.append(len(r := real_split(*a))) or r)
    converter.convert(src, cut, recipe="deepseek_v3_mxfp8_trtllm", quiet=True, workers=2)
    assert max(job_cuts) >= 4  # the experts really were cut
    a, b = load_all(whole), load_all(cut)
    assert a.keys() == b.keys() and all(same_bytes(a[n], b[n]) for n in a)
