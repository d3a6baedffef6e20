"""Issue 18: the output proven by its consumers' own code, on CPU.

Each check runs in its own process with the consumers' Python (SGLang 0.5.23 installed
--no-deps next to a CPU torch, transformers 5.x, accelerate: `.ci/run` builds it), given by
MXCONV_SGLANG_PYTHON (default `.venv-sglang/bin/python` in the repository root):
- tests/sglang_harness/load_check.py: SGLang's own loader (DefaultModelLoader weight iterator,
  model.load_weights, post_load_weights) builds the model from our config and loads our files;
  every parameter with a source equals the file's bytes, no file tensor is left unused, BF16
  kv_b_proj arrives as w_kc / w_vc bit-exact, SGLang's MXFP8 dequantization equals ours.
- tests/sglang_harness/hf_check.py: transformers' `mxfp8` support (CPU dequantize) loads the
  output; every weight equals our dequantization, logits equal our dequantized model's exactly.
Without that Python the tests skip, unless MXCONV_REQUIRE_SGLANG=1 (CI), where they fail.
Select them with `-m sglang`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import converter
from converter.models.demo import build_checkpoint

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "sglang_harness"
PYTHON = Path(os.environ.get("MXCONV_SGLANG_PYTHON") or REPO / ".venv-sglang" / "bin" / "python")
TIMEOUT_S = 300  # a harness takes 8-20 s on 2 cores; below pytest-timeout's 600 s, so a hang names the harness


def consumers_python() -> Path:
    if PYTHON.exists():
        return PYTHON
    why = (f"no consumers' Python at {PYTHON} (SGLang 0.5.23 + transformers 5.x on CPU torch; "
           "`.ci/run` builds it, or set MXCONV_SGLANG_PYTHON)")
    if os.environ.get("MXCONV_REQUIRE_SGLANG") == "1":
        pytest.fail(why + "; MXCONV_REQUIRE_SGLANG=1 requires it")
    pytest.skip(why)


def run_harness(script: str, ckpt: Path, *args: str, tmp_path: Path) -> tuple[int, dict, str]:
    """Run one harness in its own process; its exit status, JSON report and output tail."""
    python = consumers_python()
    report_path = tmp_path / f"{script}.{'-'.join(a.strip('-') for a in args) or 'main'}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "CUDA_VISIBLE"))}
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([str(python), str(HARNESS / script), str(ckpt), *args, "--json", str(report_path)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    tail = (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return proc.returncode, report, tail


def assert_loads(script: str, ckpt: Path, *args: str, tmp_path: Path, architecture: str | None = None) -> dict:
    rc, report, tail = run_harness(script, ckpt, *args, tmp_path=tmp_path)
    assert rc == 0 and report.get("ok"), f"{script} {ckpt} {args}: exit {rc}\n{report.get('failures')}\n{tail}"
    if architecture:
        assert report["architecture"] == architecture
    return report


# ------------------------------------------------------------------ checkpoints under test


@pytest.fixture(scope="module")
def outputs(tiny_sources, tmp_path_factory):
    """mxconv outputs of the tiny DeepSeek V3 sources (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("consumers")
    out = {}
    for kind, recipe in (("bf16", "deepseek_v3_mxfp8"), ("fp8", "deepseek_v3_mxfp8"),
                         ("trtllm", "deepseek_v3_mxfp8_trtllm")):
        src = tiny_sources["fp8" if kind == "fp8" else "bf16"]
        out[kind] = converter.convert(src, root / kind, recipe=recipe, quiet=True).dst
    return out


def test_demo_output_loads_in_sglang_target_with_no_override(tmp_path):
    """`mxconv demo`'s own checkpoint, exactly as written (no config key added)."""
    src = build_checkpoint(tmp_path / "src")
    dst = converter.convert(src, tmp_path / "dst", quiet=True).dst
    report = assert_loads("load_check.py", dst, tmp_path=tmp_path, architecture="DeepseekV3ForCausalLM")
    assert report["file_tensors_unconsumed"] == [] and report["params_checked"] > 0
    assert report["dequant_checked"] > 0
    assert report["kv_b_proj"] and all(e["w_kc_exact"] and e["w_vc_exact"] for e in report["kv_b_proj"].values())
    assert report["quant_config"] == "Fp8Config(mxfp8)"


def test_mtp_draft_loads_in_sglang(outputs, tmp_path):
    """The draft model (layer 3 here, not 61): kv_b_proj must stay BF16 and split exactly."""
    report = assert_loads("load_check.py", outputs["bf16"], "--draft", tmp_path=tmp_path,
                          architecture="DeepseekV3ForCausalLMNextN")
    (entry,) = report["kv_b_proj"].values()
    assert entry["quant_method"] == "UnquantizedLinearMethod" and entry["w_kc_exact"] and entry["w_vc_exact"]


def test_mtp_draft_without_the_layer_agnostic_entry_is_what_sglang_gets_wrong(outputs, tmp_path):
    """The harness catches the bug the generic entry fixes: drop it and SGLang builds an MXFP8
    kv_b_proj for the draft and casts our BF16 weight into it."""
    bad = tmp_path / "no-generic"
    bad.mkdir()
    for f in outputs["bf16"].iterdir():
        if f.name != "config.json" and f.is_file():
            (bad / f.name).symlink_to(f)
    cfg = json.loads((outputs["bf16"] / "config.json").read_text())
    qc = cfg["quantization_config"]
    for key in ("modules_to_not_convert", "ignored_layers"):  # SGLang reads ignored_layers first
        qc[key] = [m for m in qc[key] if m != "self_attn.kv_b_proj"]
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, report, tail = run_harness("load_check.py", bad, "--draft", tmp_path=tmp_path)
    assert rc == 1, tail
    assert any("kv_b_proj" in f for f in report["failures"]), report["failures"]


def test_fp8_release_source_loads_in_sglang(outputs, tmp_path):
    assert_loads("load_check.py", outputs["fp8"], tmp_path=tmp_path, architecture="DeepseekV3ForCausalLM")
    assert_loads("load_check.py", outputs["fp8"], "--draft", tmp_path=tmp_path)


def test_megatron_named_source_loads_in_sglang(tiny_sources, tmp_path):
    from test_mapping_convert import MEGATRON_ABSENT, rename_checkpoint

    src = rename_checkpoint(tiny_sources["bf16"], tmp_path / "megatron", "megatron", "", MEGATRON_ABSENT)
    result = converter.convert(src, tmp_path / "dst", quiet=True)
    assert result.mapping == "megatron"
    assert_loads("load_check.py", result.dst, tmp_path=tmp_path, architecture="DeepseekV3ForCausalLM")
    # Megatron shares the MTP layer's embedding and head with the main model; mxconv writes the
    # main model's copies, which SGLang's draft skips (it takes the target's: the same bytes).
    report = assert_loads("load_check.py", result.dst, "--draft", tmp_path=tmp_path)
    skipped = report["draft_skipped_by_sglang_equal_to_target"]
    assert skipped and all(skipped.values()), skipped


def test_trtllm_layout_is_not_an_sglang_checkpoint(outputs, tmp_path):
    """What the model card, inspect and the summary say: SGLang leaves pre-shuffled experts
    unloaded (it wants canonical experts and shuffles them itself)."""
    rc, report, tail = run_harness("load_check.py", outputs["trtllm"], tmp_path=tmp_path)
    assert rc == 1, tail
    assert any("not loaded into any parameter" in f for f in report["failures"]), report["failures"]
    assert all(".mlp.experts." in n for n in report["file_tensors_unconsumed"])


def test_transformers_mxfp8_loads_bit_exact_with_identical_logits(outputs, tmp_path):
    for kind in ("bf16", "fp8"):
        report = assert_loads("hf_check.py", outputs[kind], tmp_path=tmp_path, architecture="DeepseekV3ForCausalLM")
        assert report["tensors_checked"] > 0 and report["logits_identical"]


def test_vllm_recipe_output_loads_in_sglang_but_not_transformers(tiny_sources, tmp_path):
    """deepseek_v3_mxfp8_vllm: scales named `weight_scale` plus vLLM's config keys. SGLang renames
    the scales and loads it byte for byte; transformers 5.x reads only `weight_scale_inv`."""
    dst = converter.convert(tiny_sources["bf16"], tmp_path / "vllm", recipe="deepseek_v3_mxfp8_vllm", quiet=True).dst
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "MXFP8" and qc["ignore"] == qc["ignored_layers"] == qc["modules_to_not_convert"]
    report = assert_loads("load_check.py", dst, tmp_path=tmp_path)
    assert report["scales_named_weight_scale"] > 0 and report["dequant_checked"] > 0
    assert_loads("load_check.py", dst, "--draft", tmp_path=tmp_path)
    rc, report, tail = run_harness("hf_check.py", dst, tmp_path=tmp_path)
    assert rc == 1 and any(".weight_scale" in f for f in report["failures"]), tail


# ------------------------------------------------------------- other model families


def family_source(name: str, root: Path, **config) -> Path:
    """A tiny checkpoint of a model family (its demo config, updated with `config`)."""
    from converter.models.demo import tiny_config

    return build_checkpoint(root, {**tiny_config(name), **config})


def test_qwen3_moe_loads_in_sglang_and_transformers(tmp_path):
    # Every layer MoE, as in Qwen3-30B-A3B (mlp_only_layers []): SGLang 0.5.23's Qwen3MoE builds
    # every layer sparse ("Qwen3MoE all layers are sparse", models/qwen3_moe.py stage_facts) and
    # ignores mlp_only_layers, so a checkpoint with a dense layer does not load there.
    src = family_source("qwen3_moe", tmp_path / "src", mlp_only_layers=[])
    dst = converter.convert(src, tmp_path / "dst", quiet=True).dst
    assert_loads("load_check.py", dst, tmp_path=tmp_path, architecture="Qwen3MoeForCausalLM")
    assert_loads("hf_check.py", dst, tmp_path=tmp_path, architecture="Qwen3MoeForCausalLM")


def test_deepseek_v32_loads_in_sglang(tmp_path):
    src = family_source("deepseek_v32", tmp_path / "src")
    dst = converter.convert(src, tmp_path / "dst", quiet=True).dst
    assert_loads("load_check.py", dst, tmp_path=tmp_path, architecture="DeepseekV32ForCausalLM")
    assert_loads("load_check.py", dst, "--draft", tmp_path=tmp_path, architecture="DeepseekV3ForCausalLMNextN")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
