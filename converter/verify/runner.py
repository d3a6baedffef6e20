"""`mxconv verify SRC DST`: prove that DST is exactly what mxconv makes from SRC.

The expected conversion is planned again from SRC with the recipe and mapping recorded in DST's
provenance (mxconv.json), then checked in five stages, each of which lists every failure with
its tensor instead of stopping at the first:
1. coverage: plan outputs vs DST tensors, index vs shards, total_size, header sanity;
2. config: quantization_config vs the tensors DST really holds;
3. bytes: each output re-derived from SRC and compared byte for byte (pre-shuffled experts
   un-shuffled to say which part differs);
4. numerics: each MXFP8 weight's error against the source values, with thresholds;
5. logits (opt-in): source and dequantized DST compared as transformers models.
A check that fails is data in the report, not an exception; VerifyError means verify could not
run at all. A check that found nothing in DST it could check (an interrupted conversion) says
NOT CHECKED, never PASS, and fails the verification. When SRC is not the source DST's provenance
records, one coverage line says so (a note when SRC's shards match the recorded ones: a copy).
The JSON report always goes to DST/mxconv_verify.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from converter.errors import MxconvError, VerifyError
from converter.files import CONFIG_FILE, PROVENANCE_FILE, STATE_DIR, VERIFY_REPORT_FILE
from converter.models.family import family_or_none
from converter.plan.recipe import Recipe, load_recipe, recipe_from_dict
from converter.run.devices import resolve_devices
from converter.run.output import incomplete_reason
from converter.run.pipeline import DEFAULT_RECIPE
from converter.run.writer import write_bytes_atomic
from converter.sources.dcp import is_dcp
from converter.verify.checks import (
    BYTES,
    COVERAGE,
    LOGITS,
    NUMERICS,
    Failure,
    check_config,
    check_coverage,
    read_destination,
    read_json,
    source_sizes_changed,
)
from converter.verify.jobs import Thresholds, check_jobs
from converter.verify.report import VerifyReport, layer_summaries


def _expected_recipe(dst: Path, prov: dict | None, why: str | None, report: VerifyReport) -> tuple[Recipe, str]:
    """The recipe and mapping DST's provenance `prov` says it was made with (`why` it is None);
    the built-in default when it cannot say."""
    path = dst / PROVENANCE_FILE
    fallback = "checking against the family's default recipe"
    if prov is None:
        if (dst / STATE_DIR).is_dir() and why == "missing":  # an mxconv run that did not finish
            message = f"{incomplete_reason(dst)}; {fallback}"
        else:
            message = (f"{PROVENANCE_FILE} is {why}: the conversion is incomplete (mxconv writes it last) or not "
                       f"made by mxconv; {fallback}")
        report.failures.append(Failure(COVERAGE, None, message, str(path)))
        return _default_recipe(dst), "auto"
    if prov.get("complete") is not True:
        report.failures.append(Failure(COVERAGE, None, f"{PROVENANCE_FILE} does not say complete: true", str(path)))
    try:
        recipe = recipe_from_dict(prov.get("recipe"), str(path))
    except MxconvError as e:
        report.failures.append(Failure(COVERAGE, None, f"recorded recipe is unusable ({e.message}); {fallback}",
                                       str(path)))
        recipe = _default_recipe(dst)
    mapping = (prov.get("source") or {}).get("mapping") if isinstance(prov.get("source"), dict) else None
    report.details[COVERAGE]["provenance"] = {"source_path": (prov.get("source") or {}).get("path"),
                                              "created": prov.get("created"),
                                              "mxconv_version": prov.get("mxconv_version")}
    return recipe, mapping if isinstance(mapping, str) and mapping else "auto"


def _check_recorded_source(report: VerifyReport, prov: dict, src: Path, shards_differ: bool) -> None:
    """One coverage line when SRC is not the source DST was converted from: a failure if SRC's
    shards also differ from the recorded ones (likely the wrong SRC), else a note (a copy)."""
    source = prov.get("source") if isinstance(prov.get("source"), dict) else {}
    recorded = source.get("path")
    if not isinstance(recorded, str) or not recorded or Path(recorded).resolve() == src.resolve():
        return
    if shards_differ:
        report.failures.append(Failure(COVERAGE, None, f"DST was converted from {recorded}, not from {src}, and "
                                                       "the source shards differ (below): is SRC the right source?",
                                       str(src)))
    else:
        report.notes.append(f"DST was converted from {recorded}, not from {src}; SRC's shards have the recorded "
                            "names and sizes (a copy?), so DST is checked against SRC")


def _default_recipe(dst: Path) -> Recipe:
    config, _ = read_json(dst / CONFIG_FILE)
    qc = (config or {}).get("quantization_config")
    trtllm = isinstance(qc, dict) and qc.get("moe_weight_layout") is not None
    family = family_or_none(config or {})
    return load_recipe(family.default_recipe() if family else DEFAULT_RECIPE).with_options(
        moe_layout="trtllm" if trtllm else None)


def verify_checkpoint(src: str | Path, dst: str | Path, *, device: str = "cpu", workers: int | None = None,
                      quiet: bool = False, report_path: str | Path | None = None,
                      html_path: str | Path | None = None, logits: bool = False,
                      thresholds: Thresholds | None = None, config: str | Path | None = None) -> VerifyReport:
    """Check DST against SRC (what `mxconv verify` does); `report.passed` says whether all checks passed."""
    from converter.run.pipeline import plan_conversion

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if workers is not None and workers < 1:
        raise VerifyError(f"--workers must be at least 1, got {workers}")
    if not dst.is_dir():
        raise VerifyError("destination is not a directory", file=dst)
    if logits:
        from converter.verify.logits import require_transformers

        require_transformers()
    devices = resolve_devices(device, workers, per_gpu=None)  # each checks its own shard: no stream limit
    report = VerifyReport(src, dst, thresholds or Thresholds())
    prov, why = read_json(dst / PROVENANCE_FILE)  # read once: what every check below compares with
    recipe, mapping = _expected_recipe(dst, prov, why, report)
    if config is None:  # a DCP source: the --config directory its provenance records (unshuffle keeps it)
        source = (prov or {}).get("source")
        config = source.get("config") if isinstance(source, dict) and is_dcp(src) else None
    try:
        ckpt, view, mapping_name, plan = plan_conversion(src, recipe=recipe, mapping=mapping, config=config)
    except MxconvError as e:
        raise VerifyError(f"cannot plan the expected conversion from the source: {e}") from None
    report.recipe, report.source_format, report.mapping = recipe.name, plan.source_format.value, mapping_name
    if prov:
        changed = source_sizes_changed(prov, ckpt)
        _check_recorded_source(report, prov, src, bool(changed))
        for fname, why in changed:
            report.failures.append(Failure(COVERAGE, None, f"source shard {fname} {why}", str(src / fname)))
        recorded = (prov.get("source") or {}).get("format") if isinstance(prov.get("source"), dict) else None
        if recorded and recorded != plan.source_format.value:
            report.failures.append(Failure(COVERAGE, None, f"DST was converted from a {recorded} source, SRC is "
                                                           f"{plan.source_format.value}", str(src)))
    dest = read_destination(dst, report.failures)
    report.details[COVERAGE].update(check_coverage(plan, view, ckpt, dest, report.failures))
    check_config(plan, ckpt, dest, report.failures)
    with tqdm(total=plan.input_bytes, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
              desc="verify", dynamic_ncols=True) as bar:
        failures, report.tensors, checked, skipped = check_jobs(plan, view, dest, devices, report.thresholds,
                                                                bar.update)
    report.failures += failures
    report.details[BYTES].update({"jobs_checked": checked, "jobs_skipped": skipped})
    report.details[NUMERICS].update({"tensors": len(report.tensors), "expected": plan.counts.get("mxfp8", 0)})
    if not checked and skipped:
        report.unchecked.add(BYTES)
    if not report.tensors and plan.counts.get("mxfp8", 0):
        report.unchecked.add(NUMERICS)
    if skipped:
        report.notes.append(f"{skipped} output group(s) not byte-checked: missing or malformed in DST "
                            "(see coverage)")
    report.layers = layer_summaries(report.tensors, int(ckpt.config.get("num_hidden_layers", 0)))
    if logits:
        _run_logits(report, view, dest, devices[0])
    report.seconds = time.perf_counter() - start
    _write_reports(report, report_path, html_path)
    return report


def _run_logits(report: VerifyReport, view, dest, device) -> None:
    from converter.verify.logits import compare_logits

    report.ran.add(LOGITS)
    t = report.thresholds
    if dest.config is None:
        report.failures.append(Failure(LOGITS, None, f"cannot build the model: DST has no readable {CONFIG_FILE}"))
        return
    try:
        result = compare_logits(view, dest, dest.config, min_cosine=t.min_cosine,
                                min_top1_agreement=t.min_top1_agreement, max_kl=t.max_kl, device=device)
    except MxconvError as e:
        report.failures.append(Failure(LOGITS, None, f"could not compare logits: {e}"))
        return
    report.logits = result.to_dict()
    report.details[LOGITS].update(report.logits)
    report.failures += [Failure(LOGITS, None, p) for p in result.problems]


def _write_reports(report: VerifyReport, report_path, html_path) -> None:
    data = (json.dumps(report.to_dict(), indent=2) + "\n").encode()
    targets = [report.dst / VERIFY_REPORT_FILE] + ([Path(report_path)] if report_path else [])
    for path in targets:
        try:
            write_bytes_atomic(path, data)
            report.report_files.append(str(path))
        except MxconvError as e:
            report.notes.append(f"report not written: {e}")
    if html_path:
        from converter.verify.html import render_html

        try:
            write_bytes_atomic(Path(html_path), render_html(report).encode())
            report.report_files.append(str(html_path))
        except MxconvError as e:
            report.notes.append(f"HTML page not written: {e}")


