"""End to end, BF16 source -> MXFP8 on the tiny multi-shard checkpoint: every output byte is
checked against the independent reference quantizer; kept tensors, config, index, side files
and provenance are checked against the source."""

import hashlib
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import load_all, load_all_from, read_json, same_bytes, tensor_files
from reference import reference_mxfp8

import converter
from converter.errors import OutputError, RecipeError
from converter.models.demo import TINY_CONFIG
from converter.plan.recipe import load_recipe

KEPT_SUFFIXES = ("kv_b_proj.weight", "mlp.gate.weight", "eh_proj.weight", "shared_head.head.weight", "lm_head.weight")


QUANTIZED_MODULES = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj"}


def is_quantized_linear(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in QUANTIZED_MODULES


@pytest.fixture(scope="module")
def converted(tiny_sources, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "mxfp8"
    result = converter.convert(tiny_sources["bf16"], dst, max_shard_size="1MB", quiet=True)
    return tiny_sources["bf16"], dst, result


def test_every_output_byte(converted):
    src, dst, _ = converted
    source, out = load_all(src), load_all(dst)
    expected_names = set()
    for name, t in source.items():
        if is_quantized_linear(name):
            module = name[: -len(".weight")]
            ref_q, ref_s = reference_mxfp8(t)
            assert out[name].dtype == torch.float8_e4m3fn, name
            assert out[module + ".weight_scale_inv"].dtype == torch.uint8, name
            assert torch.equal(out[name].view(torch.uint8), ref_q), name
            assert torch.equal(out[module + ".weight_scale_inv"], ref_s), name
            expected_names |= {name, module + ".weight_scale_inv"}
        else:
            assert same_bytes(out[name], t), name
            expected_names.add(name)
    assert set(out) == expected_names


def test_kv_b_proj_and_release_high_precision_tensors_stay_bf16(converted):
    _, dst, _ = converted
    out = load_all(dst)
    layers = TINY_CONFIG["num_hidden_layers"] + TINY_CONFIG["num_nextn_predict_layers"]
    for layer in range(layers):
        assert out[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
        assert f"model.layers.{layer}.self_attn.kv_b_proj.weight_scale_inv" not in out
    mtp = f"model.layers.{TINY_CONFIG['num_hidden_layers']}."
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.head.weight", "embed_tokens.weight"):
        assert out[mtp + name].dtype == torch.bfloat16
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_config(converted):
    src, dst, result = converted
    source_cfg, cfg = read_json(src / "config.json"), read_json(dst / "config.json")
    qc = cfg.pop("quantization_config")
    assert cfg == source_cfg
    not_converted = qc.pop("modules_to_not_convert")
    assert qc.pop("ignored_layers") == not_converted  # the key SGLang reads first (issue 18)
    assert qc == {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [1, 32], "scale_fmt": "ue8m0"}
    expected = sorted(n[: -len(".weight")] for n in load_all(src) if n.endswith(KEPT_SUFFIXES))
    # every kept module, then the layer-agnostic entry SGLang's MTP draft needs (sglang#34906, issue 18)
    assert not_converted[-1] == "self_attn.kv_b_proj"
    assert sorted(not_converted[:-1]) == expected
    assert "model.layers.3.self_attn.kv_b_proj" in not_converted  # the MTP layer too


def test_index_shards_and_side_files(converted):
    src, dst, _ = converted
    index = read_json(dst / "model.safetensors.index.json")
    files = tensor_files(dst)
    assert index["weight_map"] == files
    out = load_all(dst)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    shards = sorted({f for f in files.values()})
    assert len(shards) > 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name in ("tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not list(dst.glob("*.partial")) and not list((dst / ".mxconv").glob("*.partial"))


def test_shards_respect_max_size(converted):
    """--max-shard-size 1MB: tensor bytes per shard stay within it, unless one job alone is bigger
    (a job's outputs, a weight and its scale, never straddle two shards)."""
    _, dst, result = converted
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 3
    jobs_by_shard = {s.name: s.jobs for s in result.plan.shards}
    for path in shards:
        tensors = load_all_from(path)
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 1_000_000 or len(jobs_by_shard[path.name]) == 1, path.name


def test_provenance(converted):
    src, dst, _ = converted
    prov = read_json(dst / "mxconv.json")
    assert prov["mxconv_version"] == converter.__version__ and prov["complete"] is True
    assert prov["recipe"] == load_recipe("deepseek_v3_mxfp8").to_dict()
    assert prov["source"]["path"] == str(src.resolve())
    for path in sorted(src.glob("*.safetensors")):
        assert prov["source"]["shards"][path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_keep_first_and_last_layers_in_bf16(tiny_sources, tmp_path):
    recipe = tmp_path / "r.yaml"
    data = load_recipe("deepseek_v3_mxfp8").to_dict() | {"name": "edges_bf16", "keep_first_layers": 1,
                                                         "keep_last_layers": 1}
    recipe.write_text(yaml.safe_dump(data))
    dst = tmp_path / "out"
    converter.convert(tiny_sources["bf16"], dst, recipe=recipe, quiet=True)
    out, cfg = load_all(dst), read_json(dst / "config.json")
    not_converted = cfg["quantization_config"]["modules_to_not_convert"]
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16  # first layer
    assert out["model.layers.2.mlp.experts.1.up_proj.weight"].dtype == torch.bfloat16  # last decoder layer
    assert out["model.layers.1.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.3.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn  # MTP is not "last"
    assert "model.layers.0.self_attn.q_a_proj" in not_converted
    assert "model.layers.2.mlp.experts.1.up_proj" in not_converted
    assert "model.layers.1.mlp.experts.1.up_proj" not in not_converted


@pytest.mark.parametrize("body, message", [
    ("name: x\ntarget: mxfp8\nquantize: ['*']\nbogus: 1\n", "unknown key"),
    ("name: x\ntarget: int4\n", "target must be one of"),
    ("name: x\ntarget: mxfp8\nquantize: ['*']\nscale_rule: nearest\n", "scale_rule"),
    ("name: x\ntarget: mxfp8\nquantize: ['*']\nkeep_first_layers: -1\n", "keep_first_layers"),
    ("name: x\ntarget: mxfp8\nquantize: ['*']\nscale_zero_blocks: zero\n", "scale_zero_blocks must be 'exact'"),
    ("[1, 2]\n", "mapping"),
])
def test_bad_recipes_are_rejected(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_scale_zero_blocks_flush_from_the_command_line(tiny_sources, tmp_path):
    """--scale-zero-blocks flush (TransformerEngine <= 2.12): the blocks of a weight row scaled
    down to scale byte 0 become signed zeros; the default keeps x * 2^127; nothing else differs."""
    from mutate import clone, edit_tensors

    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    src = clone(tiny_sources["bf16"], tmp_path / "src")

    def tiny_row(tensors):  # called for each shard
        if name in tensors:
            tensors[name][5] = (tensors[name][5].float() * 2.0**-125).to(torch.bfloat16)

    edit_tensors(src, tiny_row)
    outs = {}
    for mode in ("exact", "flush"):
        dst = tmp_path / mode
        proc = subprocess.run([sys.executable, "-m", "converter.cli", "convert", str(src), str(dst), "-q",
                               "--scale-zero-blocks", mode], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs[mode] = load_all(dst)
        recipe = read_json(dst / "mxconv.json")["recipe"]
        assert recipe.get("scale_zero_blocks", "exact") == mode
    exact, flush = outs["exact"], outs["flush"]
    assert torch.equal(exact[name + "_scale_inv"], flush[name + "_scale_inv"])
    assert exact[name + "_scale_inv"][5].eq(0).all()
    x = load_all(src)[name]
    assert torch.equal(flush[name].view(torch.uint8)[5], torch.signbit(x[5]).to(torch.uint8) << 7)
    assert bool((exact[name].view(torch.uint8)[5] & 0x7F).ne(0).any())
    for key in exact:
        if key != name:
            assert same_bytes(exact[key], flush[key]), key
    assert torch.equal(exact[name].view(torch.uint8)[torch.arange(len(x)) != 5],
                       flush[name].view(torch.uint8)[torch.arange(len(x)) != 5])


def test_dry_run_writes_nothing(tiny_sources, tmp_path):
    dst = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "converter.cli", "convert", str(tiny_sources["bf16"]), str(dst),
                           "--dry-run", "--max-shard-size", "300KB"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not dst.exists()
    assert "quantized to MXFP8" in proc.stdout and "model-00001-of-" in proc.stdout
    assert "kv_b_proj" in proc.stdout and "dry run: nothing written" in proc.stdout
    # one line per name pattern, not per tensor (a whole DeepSeek V3 has some 90,000 jobs), and
    # files beyond a few listed as the first and last ones
    experts = [line for line in proc.stdout.splitlines() if ".mlp.experts.#.down_proj.weight (+ weight_scale" in line]
    c = TINY_CONFIG  # MoE layers 1 and 2, and the MTP layer 3
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"] + c["num_nextn_predict_layers"]
    assert len(experts) == 1 and f" {c['n_routed_experts'] * moe_layers} x " in experts[0]
    assert experts[0].endswith(f"(layers {c['first_k_dense_replace']}-{c['num_hidden_layers']})")
    assert ".experts.0." not in proc.stdout and "more (" in proc.stdout


def test_a_directory_mxconv_did_not_write_is_refused_even_with_overwrite(tiny_sources, tmp_path):
    """--overwrite replaces an earlier mxconv run, never someone's files: a mistyped DST with the
    suggested flag must not delete a folder."""
    dst = tmp_path / "busy"
    (dst / "sub").mkdir(parents=True)
    (dst / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"not written by mxconv \(it holds precious.txt, sub/\).*pick another"):
            converter.convert(tiny_sources["bf16"], dst, quiet=True, overwrite=overwrite)
        assert (dst / "precious.txt").read_text() == "keep me" and sorted(p.name for p in dst.iterdir()) == [
            "precious.txt", "sub"]


def test_overwrite_replaces_an_earlier_mxconv_run_with_other_options(tiny_sources, tmp_path):
    dst = tmp_path / "out"
    converter.convert(tiny_sources["bf16"], dst, quiet=True, max_shard_size="1MB")
    (dst / "notes.txt").write_text("left in an mxconv output")
    with pytest.raises(OutputError, match=r"finished conversion made otherwise \(changed: .*--max-shard-size.*use --overwrite to replace it"):
        converter.convert(tiny_sources["bf16"], dst, quiet=True)
    converter.convert(tiny_sources["bf16"], dst, quiet=True, overwrite=True)
    assert not (dst / "notes.txt").exists() and read_json(dst / "mxconv.json")["complete"] is True


def test_source_is_never_modified(tiny_sources, tmp_path):
    src = tiny_sources["bf16"]
    before = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in src.iterdir()}
    converter.convert(src, tmp_path / "o", quiet=True, workers=2)
    after = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in src.iterdir()}
    assert before == after


def test_workers_and_shard_size_do_not_change_tensor_bytes(converted, tmp_path):
    _, dst, _ = converted
    other = tmp_path / "two-workers"
    converter.convert(converted[0], other, quiet=True, workers=2, max_shard_size="300KB")
    a, b = load_all(dst), load_all(other)
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)


@pytest.mark.cuda
def test_cuda_output_is_byte_identical(converted, tmp_path):
    src, dst, _ = converted
    gpu = tmp_path / "gpu"
    converter.convert(src, gpu, device="cuda", quiet=True, max_shard_size="1MB")
    for path in dst.glob("*.safetensors"):
        assert (gpu / path.name).read_bytes() == path.read_bytes(), path.name


def test_cli_help_and_version_say_what_they_mean(tmp_path):
    """Plain help (no markup that would eat `mxconv[ray]`), flags shown as flags, a --version, and
    usage errors in one line."""
    from cli_process import run_mxconv

    from converter.version import __version__

    version = run_mxconv(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"mxconv {__version__}"
    helped = run_mxconv(["convert", "--help"], tmp_path)
    text = " ".join(helped.stdout.split())
    assert helped.returncode == 0 and "pip install 'mxconv[ray]'" in text
    assert "--dry-run print the plan" in text and "<bool>" not in text
    bad = run_mxconv(["convert", "a", "b", "--workers", "0"], tmp_path)
    assert bad.returncode == 2 and "╭" not in bad.stderr and "Invalid value for '--workers'" in bad.stderr


def test_the_dry_run_job_table_says_when_a_pattern_skips_layers():
    """(layers a-b) only for every layer from a to b; otherwise how many layers lie in that span."""
    from types import SimpleNamespace as NS

    from converter.run.summary import _job_table

    def job(name):
        return NS(action="copy", outputs=[NS(name=name)])

    plan = NS(shards=[NS(jobs=[job("model.layers.1.a.weight"), job("model.layers.5.a.weight"),
                               job("model.layers.2.b.weight"), job("model.layers.3.b.weight")])])
    rows = _job_table(plan)
    assert rows[0].endswith("2 x model.layers.#.a.weight  (2 layers in 1-5)")
    assert rows[1].endswith("2 x model.layers.#.b.weight  (layers 2-3)")
