"""Bad input through the real command line: each case must end in exactly one
`mxconv: error: ...` line naming the file (and the tensor, where there is one), a non-zero exit
status and no traceback; nothing may be written to DST when preflight can tell in advance.

The CLI runs in child processes (tests/cli_process.py), so stderr, exit status and the absence of
a traceback are what a shell user would see."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from cli_process import run_mxconv
from mutate import (
    INDEX,
    clone,
    edit_header,
    edit_json,
    edit_tensors,
    file_of,
    put_nan,
    replace_file,
)

import converter.run.pipeline
from converter.errors import SourceError
from converter.models.demo import TINY_CONFIG, build_checkpoint

EXPERT_W = "model.layers.1.mlp.experts.0.gate_proj.weight"
SCALE = EXPERT_W + "_scale_inv"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-sources")
    return {p: build_checkpoint(root / p, precision=p, seed=7, extra_files=False)
            for p in ("bf16", "fp8", "fp8_ue8m0")}


@pytest.fixture
def case(tmp_path, sources):
    """(clone of a source, DST path, logs dir) for one bad-input case."""
    def make(precision: str = "bf16"):
        return clone(sources[precision], tmp_path / "src"), tmp_path / "dst", tmp_path / "logs"
    return make


def assert_clean_error(result, *must_contain: str):
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mxconv: error: "), result.stderr
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def convert(src, dst, logs, *extra):
    return run_mxconv(["convert", src, dst, "-q", *extra], logs)


def test_truncated_shard(case):
    src, dst, logs = case()
    path = file_of(src, EXPERT_W)
    replace_file(path, path.read_bytes()[:-1000])
    line = assert_clean_error(convert(src, dst, logs), path.name, "truncated")
    assert "tensor " in line
    assert not dst.exists()  # found before anything was written


def test_corrupt_header_json(case):
    src, dst, logs = case()
    path = file_of(src, EXPERT_W)
    data = bytearray(path.read_bytes())
    data[9:14] = b"\xff{{]x"
    replace_file(path, bytes(data))
    assert_clean_error(convert(src, dst, logs), path.name, "header is not valid JSON")


def test_header_length_beyond_file(case):
    src, dst, logs = case()
    path = file_of(src, EXPERT_W)
    data = path.read_bytes()
    replace_file(path, (len(data) * 2).to_bytes(8, "little") + data[8:])
    assert_clean_error(convert(src, dst, logs), path.name, "exceeds the file size")


def test_header_lies_about_sizes(case):
    src, dst, logs = case()
    path = file_of(src, EXPERT_W)
    edit_header(path, lambda h: h[EXPERT_W]["shape"].__setitem__(0, h[EXPERT_W]["shape"][0] * 2))
    assert_clean_error(convert(src, dst, logs), path.name, EXPERT_W, "needs")


def test_missing_scale(case):
    src, dst, logs = case("fp8")
    edit_tensors(src, lambda t: t.pop(SCALE, None))
    assert_clean_error(convert(src, dst, logs), file_of(src, EXPERT_W).name, EXPERT_W, "no " + SCALE)


def test_misshapen_scale(case):
    src, dst, logs = case("fp8")
    edit_tensors(src, lambda t: t.update({SCALE: torch.ones(3, 3)}) if SCALE in t else None)
    assert_clean_error(convert(src, dst, logs), file_of(src, SCALE).name, SCALE, "scale shape")


def test_config_disagrees_with_tensor_shapes(case):
    src, dst, logs = case()
    edit_json(src / "config.json", lambda c: c.update(moe_intermediate_size=96))
    assert_clean_error(convert(src, dst, logs), ".safetensors", "tensor model.layers.", "config.json")


def test_config_has_fewer_experts_than_the_tensors(case):
    src, dst, logs = case()
    edit_json(src / "config.json", lambda c: c.update(n_routed_experts=2))
    assert_clean_error(convert(src, dst, logs), ".safetensors", "mlp.gate.weight", "shape [4, 256]",
                       "implies [2, 256]")


def test_config_has_fewer_layers_than_the_tensors(case):
    src, dst, logs = case()
    edit_json(src / "config.json", lambda c: c.update(num_hidden_layers=2))
    assert_clean_error(convert(src, dst, logs), ".safetensors", "tensor model.layers.3.",
                       "config.json has 2 layers + 1 MTP")


def test_config_field_of_the_wrong_type(case):
    src, dst, logs = case()
    edit_json(src / "config.json", lambda c: c.update(num_hidden_layers="three"))
    assert_clean_error(convert(src, dst, logs), "config.json", "num_hidden_layers")


def test_missing_core_tensor(case):
    src, dst, logs = case()
    name = "model.layers.2.self_attn.o_proj.weight"
    edit_tensors(src, lambda t: t.pop(name, None))
    assert_clean_error(convert(src, dst, logs), INDEX, name, "missing")


def test_unknown_architecture(case):
    src, dst, logs = case()
    edit_json(src / "config.json", lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    assert_clean_error(convert(src, dst, logs), "config.json", "unsupported architecture", "LlamaForCausalLM")


def test_k_not_divisible_by_32(tmp_path):
    config = dict(TINY_CONFIG, q_lora_rank=72)  # q_b_proj has K = 72
    src = build_checkpoint(tmp_path / "src", config, extra_files=False)
    result = convert(src, tmp_path / "dst", tmp_path / "logs")
    assert_clean_error(result, ".safetensors", "q_b_proj.weight", "K=72 is not a multiple of 32")


def test_index_names_a_missing_file(case):
    src, dst, logs = case()
    edit_json(src / INDEX, lambda i: i["weight_map"].update({EXPERT_W: "model-00009-of-00009.safetensors"}))
    assert_clean_error(convert(src, dst, logs), INDEX, "missing file model-00009-of-00009.safetensors")


class _Boom:
    def __reduce__(self):  # unpickling this would create the marker file
        return (open, ("/tmp/mxconv-test-unpickled-marker", "w"))


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(TINY_CONFIG))
    marker = "/tmp/mxconv-test-unpickled-marker"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    result = convert(src, tmp_path / "dst", tmp_path / "logs")
    assert_clean_error(result, "pytorch_model.bin", "never unpickles")
    import os
    assert not os.path.exists(marker)


@pytest.mark.parametrize("workers", [1, 2, "2 --processes 2"])
def test_nan_in_a_weight_is_an_error_naming_file_tensor_and_block(case, workers):
    """Raised in a worker thread when workers > 1, or in one of several conversion processes
    (the other one stops and removes its unfinished shard): the same one clean line."""
    src, dst, logs = case()
    edit_tensors(src, put_nan(EXPERT_W, row=5, col=70))
    line = assert_clean_error(convert(src, dst, logs, "--workers", *str(workers).split(), "--max-shard-size", "300KB"),
                              file_of(src, EXPERT_W).name, EXPERT_W, "block (5, 2)", "--allow-nonfinite")
    assert "NaN/Inf" in line
    assert not (dst / "mxconv.json").exists()
    assert not list((dst / ".mxconv").glob("*.partial"))  # the failed shard's temporary file is gone


def test_nan_in_lossless_ue8m0_relayout_is_an_error(case):
    """The UE8M0 path keeps the FP8 bytes without quantizing; it must still refuse NaN."""
    src, dst, logs = case("fp8_ue8m0")
    edit_tensors(src, put_nan(EXPERT_W, row=1, col=33))
    assert_clean_error(convert(src, dst, logs), file_of(src, EXPERT_W).name, EXPERT_W, "NaN in block (1, 1)")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_allow_nonfinite_converts_with_one_warning_per_tensor(case, processes):
    """Several conversion processes pass their warnings on to the one the user sees."""
    src, dst, logs = case()
    other = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(src, put_nan(EXPERT_W, row=5, col=70))
    edit_tensors(src, put_nan(other, row=0, col=0, value=float("inf")))
    result = convert(src, dst, logs, "--allow-nonfinite", "--workers", "2", "--processes", processes,
                     "--max-shard-size", "300KB")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2, result.stderr
    assert all(w.startswith("mxconv: warning: tensor ") for w in warnings)
    assert any(EXPERT_W in w for w in warnings) and any(other in w for w in warnings)
    assert (dst / "mxconv.json").exists()


def test_destination_inside_source(case):
    src, _dst, logs = case()
    assert_clean_error(convert(src, src / "out", logs), "destination must not be the source or inside it")
    assert not (src / "out").exists()


# --- preflight, in process: what the architecture check accepts and refuses -------------------

MTP = "model.layers.3."


def dry_run(src):
    return converter.run.pipeline.convert(src, src.parent / "never-written", dry_run=True)


def test_source_without_its_mtp_layer_is_fine(case):
    """Fine-tuned checkpoints often drop the MTP layer; the main model still converts."""
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: [t.pop(n) for n in list(t) if n.startswith(MTP)])
    assert not any(n.startswith(MTP) for n in dry_run(src).source.tensors)


def test_mtp_layer_may_lack_the_tensors_megatron_shares(case):
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: [t.pop(MTP + n, None) for n in ("embed_tokens.weight", "shared_head.head.weight")])
    planned = dry_run(src).plan.weight_map()
    assert MTP + "eh_proj.weight" in planned and MTP + "mlp.experts.0.up_proj.weight_scale_inv" in planned
    assert MTP + "embed_tokens.weight" not in planned and MTP + "shared_head.head.weight" not in planned


def test_partial_mtp_layer_is_refused(case):
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: t.pop(MTP + "enorm.weight", None))
    with pytest.raises(SourceError, match=f"tensor {MTP}enorm.weight: missing"):
        dry_run(src)


def test_tied_embeddings_need_no_lm_head(case):
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: t.pop("lm_head.weight", None))
    with pytest.raises(SourceError, match="tensor lm_head.weight: missing"):
        dry_run(src)
    edit_json(src / "config.json", lambda c: c.update(tie_word_embeddings=True))
    dry_run(src)


def test_integer_weight_is_refused(case):
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int16)})
                 if "model.norm.weight" in t else None)
    with pytest.raises(SourceError, match="tensor model.norm.weight: dtype I16"):
        dry_run(src)


def test_scale_on_a_bf16_weight_is_refused(case):
    src, _dst, _logs = case("fp8")
    name = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(src, lambda t: t.update({name: t[name].float().to(torch.bfloat16)}) if name in t else None)
    with pytest.raises(SourceError, match=f"{name}_scale_inv: block scale for a BF16 weight"):
        dry_run(src)


def test_scale_in_a_bf16_checkpoint_is_refused(case):
    src, _dst, _logs = case()
    edit_tensors(src, lambda t: t.update({SCALE: torch.ones(1, 2)}) if EXPERT_W in t else None)
    with pytest.raises(SourceError, match="block scale in a checkpoint whose config.json has no quantization_config"):
        dry_run(src)


def test_config_describing_a_far_larger_model_is_refused_quickly(case):
    src, _dst, _logs = case()
    edit_json(src / "config.json", lambda c: c.update(n_routed_experts=10**9))
    with pytest.raises(SourceError, match="config and weights disagree"):
        dry_run(src)


@pytest.mark.parametrize("extra, says", [
    (["--recipe", "last8_bf16"], "deepseek_v3 has no 'last8_bf16' recipe (that role is qwen3_moe's); its roles: bf16, "
                                 "mxfp8, trtllm"),
    (["--recipe", "nope"], "no built-in recipe 'nope'; give a role of the source's family (mxfp8, trtllm, bf16"),
    (["--scale-rule", "bogus"], "error: --scale-rule: must be 'rceil' or 'floor', got 'bogus'"),
    (["--scale-zero-blocks", "zero"], "error: --scale-zero-blocks: must be 'exact'"),
])
def test_a_bad_option_is_named_as_the_flag_or_role_it_is(case, extra, says):
    src, dst, logs = case("fp8")
    assert_clean_error(convert(src, dst, logs, *extra), says)
    assert not dst.exists()


def test_a_missing_source_is_said_to_be_missing(case, tmp_path):
    src, dst, logs = case()
    assert_clean_error(convert(tmp_path / "nope", dst, logs), f"file {tmp_path / 'nope'}: source does not exist")
    assert_clean_error(convert(src / "config.json", dst, logs), "source is not a directory")


def test_shard_sizes_are_read_as_written_and_a_bare_unit_is_refused():
    """5GB is decimal (Hugging Face's max_shard_size), 4GiB binary; a bare 5G could be either."""
    from converter.errors import MxconvError
    from converter.units import parse_size

    assert (parse_size("5GB"), parse_size("500MB"), parse_size("4GiB")) == (5 * 10**9, 500 * 10**6, 4 * 2**30)
    with pytest.raises(MxconvError, match=r"'5G' could mean either: 5GB or 5GiB"):
        parse_size("5G")
    with pytest.raises(MxconvError, match="cannot read size 'lots'"):
        parse_size("lots")


def test_a_path_too_long_for_the_file_system_is_still_a_one_line_error(case, tmp_path):
    """Naming the file in the message must not itself fail (a stat of it raises ENAMETOOLONG)."""
    src, dst, logs = case("fp8")
    assert_clean_error(convert(src, dst, logs, "--recipe", str(tmp_path / ("a" * 300 + ".yaml"))), "cannot read recipe")
