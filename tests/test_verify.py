"""`mxconv verify`: a correct conversion passes every check (logits included); each corruption of
the issue's list is caught by the right check, with the tensor named.

Corruptions are made on copies of one converted destination by editing bytes at the offsets that
the shard headers give (read here with a few lines of our own, not with converter's reader).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import converter
from converter.errors import VerifyError
from converter.files import CONFIG_FILE, INDEX_FILE, PROVENANCE_FILE, VERIFY_REPORT_FILE
from converter.numerics.dispatch import quantize_mxfp8
from converter.numerics.reference import ScaleRule
from converter.numerics.trtllm_layout import unpack_w13
from converter.plan.recipe import load_recipe
from converter.verify.jobs import Thresholds, error_stats, judge
from converter.verify.logits import logits_metrics
from converter.verify.report import format_summary
from converter.verify.runner import verify_checkpoint

EXPERT = "model.layers.2.mlp.experts.1"
Q_B = "model.layers.2.self_attn.q_b_proj.weight"
W13 = "model.layers.1.mlp.experts.0.w13_weight"


# ------------------------------------------------------------------------------ helpers


def header(path: Path) -> tuple[int, dict]:
    """(data start, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def locate(root: Path, name: str) -> tuple[Path, int, int, dict]:
    """(file, absolute start, end, header entry) of one tensor of a checkpoint directory."""
    shard = json.loads((root / INDEX_FILE).read_text())["weight_map"][name]
    start, h = header(root / shard)
    a, b = h[name]["data_offsets"]
    return root / shard, start + a, start + b, h[name]


def read_span(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def write_span(path: Path, start: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(data)


def flip_byte(root: Path, name: str, element: int, mask: int) -> None:
    path, start, end, _ = locate(root, name)
    assert start + element < end
    old = read_span(path, start + element, start + element + 1)[0]
    write_span(path, start + element, bytes([old ^ mask]))


def overwrite(root: Path, name: str, tensor: torch.Tensor) -> None:
    path, start, end, _ = locate(root, name)
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(data) == end - start
    assert data != read_span(path, start, end), "the corruption must change the bytes"
    write_span(path, start, data)


def read(root: Path, name: str) -> torch.Tensor:
    path, start, end, entry = locate(root, name)
    raw = torch.frombuffer(bytearray(read_span(path, start, end)), dtype=torch.uint8)
    dtype = {"F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "BF16": torch.bfloat16}[entry["dtype"]]
    return raw.view(dtype).reshape(entry["shape"])


def rewrite_shard(root: Path, name: str, change) -> None:
    """Rewrite the shard holding `name` with `change(tensors)` applied; fix the index to match."""
    shard = json.loads((root / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(str(root / shard))
    change(tensors)
    save_file(tensors, str(root / shard), metadata={"format": "pt"})
    index = json.loads((root / INDEX_FILE).read_text())
    wm = {k: v for k, v in index["weight_map"].items() if v != shard}
    wm.update({k: shard for k in tensors})
    sizes = {}
    for fname in set(wm.values()):
        _, h = header(root / fname)
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"})
    index["weight_map"] = wm
    index["metadata"]["total_size"] = sum(sizes.values())
    (root / INDEX_FILE).write_text(json.dumps(index))


def failures(report, check: str) -> list:
    return [f for f in report.failures if f.check == check]


def named(report, check: str, tensor: str) -> list:
    return [f for f in failures(report, check) if f.tensor == tensor]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tiny_sources, tmp_path_factory):
    """The tiny BF16 source converted with the default recipe, verified once with logits and HTML."""
    root = tmp_path_factory.mktemp("verify")
    dst = root / "mxfp8"
    converter.convert(tiny_sources["bf16"], dst, max_shard_size="1MB", quiet=True)
    report = verify_checkpoint(tiny_sources["bf16"], dst, quiet=True, logits=True,
                               report_path=root / "report.json", html_path=root / "report.html")
    return tiny_sources["bf16"], dst, report, root


@pytest.fixture
def corrupt(converted, tmp_path):
    """A fresh copy of the converted destination to break, and a function that verifies it."""
    src, dst, _, _ = converted
    copy = tmp_path / "dst"
    shutil.copytree(dst, copy)
    (copy / VERIFY_REPORT_FILE).unlink()

    def verify(**kwargs):
        report = verify_checkpoint(src, copy, quiet=True, **kwargs)
        assert not report.passed
        text = format_summary(report)
        assert "FAILED" in text
        return report

    return src, copy, verify


# -------------------------------------------------------------------------- passing runs


def test_correct_conversion_passes_every_check(converted):
    _, dst, report, root = converted
    assert report.passed, format_summary(report)
    for check in ("coverage", "config", "bytes", "numerics", "logits"):
        assert report.check_passed(check) is True, check
    assert report.details["bytes"]["jobs_checked"] == 99 and report.details["bytes"]["jobs_skipped"] == 0
    assert len(report.tensors) == 64  # every MXFP8 weight measured
    assert all(30 < t.sqnr_db < 33 for t in report.tensors)  # RCEIL on Gaussian weights: ~31 dB
    assert all(t.saturated_fraction == 0 and t.lost_blocks == 0 for t in report.tensors)
    assert all(t.max_block_rel_err <= 1 / 16 for t in report.tensors)
    assert [s.label for s in report.layers] == ["0", "1", "2", "3 (MTP)"]
    assert report.logits["cosine"] > 0.95 and report.logits["top1_agreement"] > 0.6


def test_json_report_schema(converted):
    _, dst, report, root = converted
    data = json.loads((dst / VERIFY_REPORT_FILE).read_text())
    assert data == json.loads((root / "report.json").read_text())
    assert data["passed"] is True
    assert set(data["checks"]) == {"coverage", "config", "bytes", "numerics", "logits"}
    assert all(c["passed"] is True and c["failures"] == [] for c in data["checks"].values())
    s = data["summary"]
    assert s["tensors"] == 64 and 30 < s["min_sqnr_db"] <= s["mean_sqnr_db"] < 33
    assert set(s["logits"]) == {"cosine", "top1_agreement", "kl"} and s["logits"]["kl"] < 0.05
    assert len(data["layers"]) == 4 and len(data["tensors"]) == 64


def test_html_page(converted):
    _, _, report, root = converted
    page = (root / "report.html").read_text()
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        tags: list = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    p = Collect()
    p.feed(page)
    assert p.tags.count("svg") == 4  # SQNR, error/amax, abs error per layer; SQNR per tensor
    assert p.tags.count("polyline") == 4  # min + mean SQNR, two error lines
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "PASS" in page and "3 (MTP)" in page


def test_summary_table(converted):
    text = format_summary(converted[2])
    for row in ("coverage   PASS", "config     PASS", "bytes      PASS", "numerics   PASS", "logits     PASS"):
        assert row in text
    assert "3 (MTP)" in text and text.rstrip().splitlines()[-1].startswith("PASSED")


@pytest.mark.parametrize("precision", ["fp8", "fp8_ue8m0"])
def test_fp8_sources_pass(tiny_sources, tmp_path, precision):
    dst = tmp_path / "dst"
    converter.convert(tiny_sources[precision], dst, max_shard_size="1MB", quiet=True)
    report = verify_checkpoint(tiny_sources[precision], dst, quiet=True)
    assert report.passed, format_summary(report)
    if precision == "fp8_ue8m0":  # lossless re-layout: the error is exactly zero
        assert all(t.sqnr_db == float("inf") and t.max_abs_err == 0 for t in report.tensors)
    else:
        assert all(t.sqnr_db > 25 for t in report.tensors)


# ------------------------------------------------------------------------- corruptions


def test_flipped_scale_byte(corrupt):
    _, dst, verify = corrupt
    name = f"{EXPERT}.up_proj.weight_scale_inv"
    flip_byte(dst, name, element=5, mask=0x01)
    report = verify(workers=2)  # shards checked in parallel
    assert [f.tensor for f in failures(report, "bytes")] == [name]
    assert "first at [0, 5]" in failures(report, "bytes")[0].message
    assert named(report, "numerics", f"{EXPERT}.up_proj.weight")  # that block is off by 2x
    assert report.check_passed("coverage") and report.check_passed("config")


def test_flipped_weight_byte(corrupt):
    _, dst, verify = corrupt
    flip_byte(dst, Q_B, element=1000, mask=0x08)
    report = verify()
    assert [f.tensor for f in failures(report, "bytes")] == [Q_B]
    assert "1 of" in failures(report, "bytes")[0].message
    assert report.check_passed("coverage") and report.check_passed("config")


def test_gate_and_up_swapped_in_one_expert(corrupt):
    _, dst, verify = corrupt
    for suffix in ("weight", "weight_scale_inv"):
        gate, up = read(dst, f"{EXPERT}.gate_proj.{suffix}"), read(dst, f"{EXPERT}.up_proj.{suffix}")
        overwrite(dst, f"{EXPERT}.gate_proj.{suffix}", up)
        overwrite(dst, f"{EXPERT}.up_proj.{suffix}", gate)
    report = verify()
    bad = {f.tensor: f.message for f in failures(report, "bytes")}
    assert set(bad) == {f"{EXPERT}.{p}.{s}" for p in ("gate_proj", "up_proj") for s in ("weight", "weight_scale_inv")}
    assert "gate and up swapped" in bad[f"{EXPERT}.gate_proj.weight"]
    assert report.check_passed("coverage") and report.check_passed("config")


def test_missing_tensor(corrupt):
    _, dst, verify = corrupt
    name = f"{EXPERT}.down_proj.weight"
    rewrite_shard(dst, name, lambda t: t.pop(name))
    report = verify()
    assert [f.tensor for f in failures(report, "coverage")] == [name]
    assert "missing" in failures(report, "coverage")[0].message
    assert report.check_passed("bytes")  # the rest still matches


def test_unexpected_extra_tensor(corrupt):
    _, dst, verify = corrupt
    extra = "model.layers.1.self_attn.o_proj.bias"
    rewrite_shard(dst, Q_B, lambda t: t.__setitem__(extra, torch.zeros(256, dtype=torch.bfloat16)))
    report = verify()
    assert [f.tensor for f in failures(report, "coverage")] == [extra]
    assert "unexpected" in failures(report, "coverage")[0].message
    assert report.check_passed("bytes")


def test_floor_rule_on_one_tensor(corrupt):
    src, dst, verify = corrupt
    name = "model.layers.1.mlp.shared_experts.down_proj"
    shard = json.loads((src / INDEX_FILE).read_text())["weight_map"][f"{name}.weight"]
    x = load_file(str(src / shard))[f"{name}.weight"]
    q, s = quantize_mxfp8(x, ScaleRule.FLOOR)
    overwrite(dst, f"{name}.weight", q)
    overwrite(dst, f"{name}.weight_scale_inv", s)
    report = verify()
    assert {f.tensor for f in failures(report, "bytes")} == {f"{name}.weight", f"{name}.weight_scale_inv"}
    problem = named(report, "numerics", f"{name}.weight")[0].message
    assert "clipped" in problem and "of block amax" in problem  # FLOOR clips block maxima


def test_kv_b_proj_quantized(converted, tmp_path):
    src = converted[0]
    base = load_recipe("deepseek_v3_mxfp8")
    recipe = base.with_options(quantize=base.quantize + ("model.layers.*.self_attn.kv_b_proj",), keep_bf16=(),
                               name="kv_b_quantized")
    dst = tmp_path / "dst"
    converter.convert(src, dst, recipe=recipe, max_shard_size="1MB", quiet=True)
    report = verify_checkpoint(src, dst, quiet=True)
    assert not report.passed
    kv_b = {f.tensor for f in failures(report, "config") if f.tensor and "kv_b_proj" in f.tensor}
    assert kv_b == {f"model.layers.{i}.self_attn.kv_b_proj.weight" for i in range(4)}
    assert "must stay BF16" in named(report, "config", "model.layers.0.self_attn.kv_b_proj.weight")[0].message
    assert report.check_passed("bytes") and report.check_passed("coverage")  # the recipe was followed


def test_truncated_shard(corrupt):
    _, dst, verify = corrupt
    index = json.loads((dst / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    start, h = header(dst / shard)
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    os.truncate(dst / shard, (dst / shard).stat().st_size - 100)
    report = verify()
    assert last in [f.tensor for f in failures(report, "coverage")]
    assert "truncated" in named(report, "coverage", last)[0].message
    assert report.check_passed("bytes")  # tensors before the cut still verified


def test_index_names_a_missing_file(corrupt):
    _, dst, verify = corrupt
    index = json.loads((dst / INDEX_FILE).read_text())
    index["weight_map"][Q_B] = "model-00009-of-00009.safetensors"
    (dst / INDEX_FILE).write_text(json.dumps(index))
    report = verify()
    messages = [f.message for f in named(report, "coverage", Q_B)]
    assert any("model-00009-of-00009.safetensors, which does not exist" in m for m in messages)


@pytest.mark.parametrize("written", [0, 2])
def test_interrupted_conversion_is_not_checked(corrupt, written):
    """An interrupted DST (shards only, no index, config.json or mxconv.json yet): a check that
    had nothing it could check says NOT CHECKED, never PASS, and the verification fails."""
    _, dst, verify = corrupt
    shards = sorted(set(json.loads((dst / INDEX_FILE).read_text())["weight_map"].values()))
    for name in shards[written:] + [INDEX_FILE, CONFIG_FILE, PROVENANCE_FILE]:
        (dst / name).unlink()
    report = verify(html_path=dst.parent / "report.html")
    first = failures(report, "coverage")[0].message
    assert first.startswith(f"interrupted mxconv conversion: {written} of {len(shards)} shards written, no "
                            "mxconv.json; rerun the same `mxconv convert` command to resume it"), first
    text = format_summary(report)
    checks = json.loads((dst / VERIFY_REPORT_FILE).read_text())["checks"]
    if written == 0:
        for check in ("bytes", "numerics"):
            assert report.result(check) == "NOT CHECKED" and report.check_passed(check) is None
            assert f"{check:<10} NOT CHECKED" in text and f"{check:<10} PASS" not in text, text
            assert checks[check]["passed"] is None and checks[check]["checked"] is False
        assert "none of the 64 MXFP8 weights measurable in DST" in text
        assert (dst.parent / "report.html").read_text().count(">NOT CHECKED</span>") == 2
    else:  # what is there is checked, and says how much of it there is
        assert report.result("bytes") == report.result("numerics") == "PASS"
        assert f"{len(report.tensors)} of 64 MXFP8 weights" in text and 0 < len(report.tensors) < 64
    assert text.rstrip().splitlines()[-1].startswith(f"FAILED: {2 if written else 0} of 4 checks passed")


def test_wrong_source_is_named(corrupt, tiny_sources, tmp_path):
    """SRC other than the recorded source: one line names the source DST was converted from, a
    failure when SRC's shards differ from the recorded ones, a note when they match (a copy)."""
    src, dst, _ = corrupt  # a copy of the conversion, not corrupted
    recorded = json.loads((dst / PROVENANCE_FILE).read_text())["source"]["path"]
    line = f"DST was converted from {recorded}, not from {tiny_sources['fp8']}"
    wrong = verify_checkpoint(tiny_sources["fp8"], dst, quiet=True)
    assert not wrong.passed
    assert failures(wrong, "coverage")[0].message.startswith(line + ", and the source shards differ")
    assert sum(line in f.message for f in wrong.failures) == 1 and not any(line in n for n in wrong.notes)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    moved = verify_checkpoint(copy, dst, quiet=True)
    assert moved.passed, format_summary(moved)
    assert [n for n in moved.notes if n.startswith(f"DST was converted from {recorded}, not from {copy}; ")]
    assert not any("DST was converted from" in n for n in verify_checkpoint(src, dst, quiet=True).notes)


def test_missing_provenance_is_a_failure_not_a_crash(corrupt):
    _, dst, verify = corrupt
    (dst / PROVENANCE_FILE).unlink()
    report = verify()
    assert [f.file for f in failures(report, "coverage")] == [str(dst / PROVENANCE_FILE)]
    assert report.check_passed("bytes")  # the default recipe is what made it


# ------------------------------------------------------------------- TRT-LLM MoE layout


@pytest.fixture(scope="module")
def trtllm(tiny_sources, tmp_path_factory):
    dst = tmp_path_factory.mktemp("verify_trtllm") / "dst"
    converter.convert(tiny_sources["bf16"], dst, recipe="deepseek_v3_mxfp8_trtllm", max_shard_size="1MB",
                      quiet=True)
    return tiny_sources["bf16"], dst


def test_trtllm_layout_passes(trtllm):
    src, dst = trtllm
    report = verify_checkpoint(src, dst, quiet=True, logits=True)
    assert report.passed, format_summary(report)
    stored = {t.name: t.stored_as for t in report.tensors}
    assert stored[f"{W13[:-len('w13_weight')]}gate_proj.weight"] == W13  # measured after un-shuffling
    assert report.logits["cosine"] > 0.95


@pytest.mark.parametrize("mistake", ["unshuffled", "gate_up_order"])
def test_wrong_shuffle(trtllm, tmp_path, mistake):
    src, dst = trtllm
    copy = tmp_path / "dst"
    shutil.copytree(dst, copy)
    q, s = read(copy, W13), read(copy, W13 + "_scale_inv")
    gate, _, up, _ = unpack_w13(q, s)
    if mistake == "unshuffled":  # [up; gate] in canonical row order: shuffle and interleave skipped
        wrong = torch.cat([up.view(torch.uint8), gate.view(torch.uint8)])
    else:  # the shuffle applied to [gate; up] instead of [up; gate]
        from converter.numerics.trtllm_layout import pack_w13

        wrong, _ = pack_w13(up, s[: s.shape[0] // 2], gate, s[s.shape[0] // 2:])
        wrong = wrong.view(torch.uint8)
    overwrite(copy, W13, wrong.view(torch.float8_e4m3fn))
    report = verify_checkpoint(src, copy, quiet=True)
    assert not report.passed
    msg = named(report, "bytes", W13)[0].message
    expected = "wrong row shuffle" if mistake == "unshuffled" else "gate and up are swapped"
    assert expected in msg
    assert report.check_passed("coverage") and report.check_passed("config")


# --------------------------------------------------------------------- pure numerics


def test_error_stats_thresholds():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 512, generator=gen) * 0.05).to(torch.bfloat16)
    t = Thresholds()
    rceil = error_stats(x, *quantize_mxfp8(x, ScaleRule.RCEIL))
    assert 30 < rceil["sqnr_db"] < 33 and rceil["saturated_fraction"] == 0 and rceil["lost_blocks"] == 0
    assert rceil["max_block_rel_err"] <= 1 / 16 and judge(rceil, "quantize", t) == ()
    floor = error_stats(x, *quantize_mxfp8(x, ScaleRule.FLOOR))
    assert floor["saturated_fraction"] > 0 and floor["max_block_rel_err"] > 1 / 16
    assert len(judge(floor, "quantize", t)) == 2
    q, s = quantize_mxfp8(x)
    exact_x = q.float() * 2.0 ** (s.float().repeat_interleave(32, 1) - 127)
    before = exact_x.clone()
    exact = error_stats(exact_x, q, s, chunk_elems=4096)  # float32 input, many chunks
    assert exact["sqnr_db"] == float("inf") and exact["max_abs_err"] == 0
    assert torch.equal(exact_x, before)  # the caller's tensor is left as it was
    chunked = error_stats(x, *quantize_mxfp8(x, ScaleRule.RCEIL), chunk_elems=4096)
    assert abs(chunked["sqnr_db"] - rceil["sqnr_db"]) < 1e-4 and chunked["max_abs_err"] == rceil["max_abs_err"]
    lost = error_stats(x, torch.zeros_like(q), s)  # every block stored as zeros
    assert lost["lost_blocks"] == 256 * 16 and lost["zero_blocks"] == 256 * 16
    assert any("stored as zeros" in p for p in judge(lost, "quantize", t))
    assert judge({**rceil, "max_abs_err": 1e-9}, "relayout", t)  # a re-layout must be exact


def test_error_stats_nonfinite_source():
    x = torch.randn(32, 64)
    x[3, 7] = float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, s = quantize_mxfp8(x, allow_nonfinite=True)
    stats = error_stats(x, q, s)
    assert stats["nonfinite_source"] == 1 and 25 < stats["sqnr_db"] < 40
    assert judge(stats, "quantize", Thresholds(), allow_nonfinite=True) == ()
    assert "NaN/Inf source values" in judge(stats, "quantize", Thresholds())[0]


def test_logits_metrics():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 100, generator=gen)
    same = logits_metrics(ref, ref.clone(), min_cosine=0.95, min_top1_agreement=0.6, max_kl=0.05)
    assert same.problems == [] and same.top1_agreement == 1 and abs(same.cosine - 1) < 1e-12 and abs(same.kl) < 1e-12
    other = logits_metrics(ref, torch.randn(64, 100, generator=gen), min_cosine=0.95, min_top1_agreement=0.6,
                           max_kl=0.05)
    assert len(other.problems) == 3 and other.cosine < 0.5


# --------------------------------------------------------------------------------- CLI


def test_cli_verify(converted, corrupt, tmp_path):
    from typer.testing import CliRunner

    from converter.cli import app

    src, dst, _, _ = converted
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(src), str(dst), "-q", "--report", str(tmp_path / "r.json"),
                             "--html", str(tmp_path / "r.html")])
    assert ok.exit_code == 0, ok.output
    assert "numerics   PASS" in ok.output and "logits     skip" in ok.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True and (tmp_path / "r.html").exists()
    _, copy, _ = corrupt
    flip_byte(copy, Q_B, element=7, mask=0x08)
    bad = runner.invoke(app, ["verify", str(src), str(copy), "-q"])
    assert bad.exit_code == 1 and f"[bytes] {Q_B}:" in bad.output and "Traceback" not in bad.output
    fresh = runner.invoke(app, ["convert", str(src), str(tmp_path / "fresh"), "--max-shard-size", "1MB", "-q",
                                "--verify"])
    assert fresh.exit_code == 0 and "PASSED: 4 of 4 checks passed" in fresh.output, fresh.output
    gone = runner.invoke(app, ["verify", str(src), str(tmp_path / "nope"), "-q"])
    assert gone.exit_code == 1 and "Traceback" not in gone.output
    assert gone.output.strip().splitlines() == [f"mxconv: error: file {tmp_path / 'nope'}: destination is not a "
                                                "directory"]


# ------------------------------------------------------------------------------ errors


def test_unusable_inputs_raise_verify_error(converted, tmp_path):
    src, dst, _, _ = converted
    with pytest.raises(VerifyError, match="not a directory"):
        verify_checkpoint(src, tmp_path / "nope", quiet=True)
    with pytest.raises(VerifyError, match="workers"):
        verify_checkpoint(src, dst, quiet=True, workers=0)


def test_logits_without_transformers(converted, monkeypatch):
    src, dst, _, _ = converted
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(VerifyError, match="--logits needs transformers"):
        verify_checkpoint(src, dst, quiet=True, logits=True)


@pytest.mark.cuda
def test_verify_on_cuda_matches_cpu(converted, corrupt):
    src, dst, cpu, _ = converted
    gpu = verify_checkpoint(src, dst, quiet=True, device="cuda", workers=2, logits=True)
    assert gpu.passed, format_summary(gpu)
    assert [t.name for t in gpu.tensors] == [t.name for t in cpu.tensors]
    for a, b in zip(gpu.tensors, cpu.tensors, strict=True):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-6) and a.max_abs_err == b.max_abs_err
    assert gpu.logits["top1_agreement"] == pytest.approx(cpu.logits["top1_agreement"], abs=0.02)
    _, copy, verify = corrupt
    flip_byte(copy, Q_B, element=1000, mask=0x08)
    report = verify(device="cuda")
    assert [f.tensor for f in failures(report, "bytes")] == [Q_B]
