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
run at all. The JSON report always goes to DST/mxconv_verify.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .errors import MxconvError, VerifyError
from .execute import resolve_devices
from .files import CONFIG_FILE, PROVENANCE_FILE, VERIFY_REPORT_FILE
from .pipeline import DEFAULT_RECIPE
from .recipe import Recipe, load_recipe, recipe_from_dict
from .safetensors_io import write_bytes_atomic
from .verify_checks import (BYTES, CHECKS, CONFIG, COVERAGE, LOGITS, NUMERICS, Failure, check_config,
                            check_coverage, read_destination, read_json, source_sizes_changed)
from .verify_jobs import TensorNumerics, Thresholds, check_jobs

_SHOWN_FAILURES = 8  # per check, in the terminal summary


@dataclass
class LayerSummary:
    label: str  # "0", "61 (MTP)", "other"
    layer: int | None
    tensors: int
    min_sqnr_db: float | None  # None: every tensor exact
    mean_sqnr_db: float | None
    max_abs_err: float
    max_block_rel_err: float
    saturated_fraction: float  # the worst tensor's
    failures: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    src: Path
    dst: Path
    thresholds: Thresholds
    failures: list[Failure] = field(default_factory=list)
    ran: set[str] = field(default_factory=lambda: {COVERAGE, CONFIG, BYTES, NUMERICS})
    details: dict[str, dict] = field(default_factory=lambda: {c: {} for c in CHECKS})
    tensors: list[TensorNumerics] = field(default_factory=list)
    layers: list[LayerSummary] = field(default_factory=list)
    logits: dict | None = None
    recipe: str | None = None
    source_format: str | None = None
    mapping: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_files: list[str] = field(default_factory=list)

    def check_passed(self, check: str) -> bool | None:
        """None when the check did not run."""
        if check not in self.ran:
            return None
        return not any(f.check == check for f in self.failures)

    @property
    def passed(self) -> bool:
        return all(self.check_passed(c) is not False for c in CHECKS)

    def failures_of(self, check: str) -> list[Failure]:
        return [f for f in self.failures if f.check == check]

    def summary(self) -> dict:
        finite = [t.sqnr_db for t in self.tensors if math.isfinite(t.sqnr_db)]
        return {"tensors": len(self.tensors),
                "exact_tensors": sum(1 for t in self.tensors if math.isinf(t.sqnr_db) and t.sqnr_db > 0),
                "min_sqnr_db": min(finite) if finite else None,
                "mean_sqnr_db": sum(finite) / len(finite) if finite else None,
                "max_block_rel_err": max((t.max_block_rel_err for t in self.tensors), default=None),
                "logits": ({k: self.logits[k] for k in ("cosine", "top1_agreement", "kl")}
                           if self.logits else None)}

    def to_dict(self) -> dict:
        checks = {c: {"passed": self.check_passed(c), "ran": c in self.ran,
                      "failures": [f.to_dict() for f in self.failures_of(c)], **self.details.get(c, {})}
                  for c in CHECKS}
        return _json_safe({
            "passed": self.passed, "checks": checks, "summary": self.summary(),
            "src": str(self.src), "dst": str(self.dst), "recipe": self.recipe, "source_format": self.source_format,
            "mapping": self.mapping, "mxconv_version": __version__, "seconds": round(self.seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "thresholds": dict(self.thresholds.__dict__), "notes": self.notes,
            "layers": [layer.to_dict() for layer in self.layers], "tensors": [t.to_dict() for t in self.tensors]})


def _json_safe(value):
    """JSON has no Infinity/NaN: they become null (exactness is stated separately)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _expected_recipe(dst: Path, report: VerifyReport) -> tuple[Recipe, str]:
    """The recipe and mapping DST says it was made with; the built-in default when it cannot say."""
    path = dst / PROVENANCE_FILE
    prov, why = read_json(path)
    fallback = f"checking against the built-in recipe {DEFAULT_RECIPE}"
    if prov is None:
        report.failures.append(Failure(COVERAGE, None, f"{PROVENANCE_FILE} is {why}: the conversion is incomplete "
                                                       f"(mxconv writes it last) or not made by mxconv; {fallback}",
                                       str(path)))
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


def _default_recipe(dst: Path) -> Recipe:
    config, _ = read_json(dst / CONFIG_FILE)
    qc = (config or {}).get("quantization_config")
    trtllm = isinstance(qc, dict) and qc.get("moe_weight_layout") is not None
    return load_recipe(DEFAULT_RECIPE).with_options(moe_layout="trtllm" if trtllm else None)


def verify_checkpoint(src: str | Path, dst: str | Path, *, device: str = "cpu", workers: int | None = None,
                      quiet: bool = False, report_path: str | Path | None = None,
                      html_path: str | Path | None = None, logits: bool = False,
                      thresholds: Thresholds | None = None) -> VerifyReport:
    """Check DST against SRC (what `mxconv verify` does); `report.passed` says whether all checks passed."""
    from .pipeline import plan_conversion

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if workers is not None and workers < 1:
        raise VerifyError(f"--workers must be at least 1, got {workers}")
    if not dst.is_dir():
        raise VerifyError("destination is not a directory", file=dst)
    if logits:
        from .logits import require_transformers

        require_transformers()
    devices = resolve_devices(device, workers)
    report = VerifyReport(src, dst, thresholds or Thresholds())
    recipe, mapping = _expected_recipe(dst, report)
    try:
        ckpt, view, mapping_name, plan = plan_conversion(src, recipe=recipe, mapping=mapping)
    except MxconvError as e:
        raise VerifyError(f"cannot plan the expected conversion from the source: {e}") from None
    report.recipe, report.source_format, report.mapping = recipe.name, plan.source_format.value, mapping_name
    prov, _ = read_json(dst / PROVENANCE_FILE)
    if prov:
        for fname, why in source_sizes_changed(prov, ckpt):
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
    report.details[NUMERICS]["tensors"] = len(report.tensors)
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
    from .logits import compare_logits

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


def layer_summaries(tensors: list[TensorNumerics], num_hidden_layers: int) -> list[LayerSummary]:
    groups: dict[int | None, list[TensorNumerics]] = {}
    for t in tensors:
        groups.setdefault(t.layer, []).append(t)
    out = []
    for layer in sorted(groups, key=lambda k: (k is None, k or 0)):
        ts = groups[layer]
        finite = [t.sqnr_db for t in ts if math.isfinite(t.sqnr_db)]
        label = "other" if layer is None else f"{layer} (MTP)" if layer >= num_hidden_layers else str(layer)
        out.append(LayerSummary(label, layer, len(ts), min(finite) if finite else None,
                                sum(finite) / len(finite) if finite else None,
                                max(t.max_abs_err for t in ts), max(t.max_block_rel_err for t in ts),
                                max(t.saturated_fraction for t in ts), sum(1 for t in ts if t.problems)))
    return out


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
        from .report_html import render_html

        try:
            write_bytes_atomic(Path(html_path), render_html(report).encode())
            report.report_files.append(str(html_path))
        except MxconvError as e:
            report.notes.append(f"HTML page not written: {e}")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "exact"
    return f"{value:.{digits}f}"


def check_detail(report: VerifyReport, check: str) -> str:
    d = report.details.get(check, {})
    if check == COVERAGE:
        dropped = len(d.get("dropped_by_mapping", []))
        return (f"{d.get('planned_outputs', 0)} tensors planned from {d.get('source_tensors', 0)} source tensors, "
                f"{d.get('dst_tensors', 0)} in DST" + (f", {dropped} dropped by the mapping" if dropped else ""))
    if check == CONFIG:
        return "quantization_config vs tensors, modules_to_not_convert, MoE layout"
    if check == BYTES:
        return f"{d.get('jobs_checked', 0)} output groups re-derived from SRC" + (
            f", {d['jobs_skipped']} not checkable" if d.get("jobs_skipped") else "")
    if check == NUMERICS:
        s = report.summary()
        if not s["tensors"]:
            return "no MXFP8 weights"
        exact = f", {s['exact_tensors']} exact" if s["exact_tensors"] else ""
        return (f"{s['tensors']} MXFP8 weights: SQNR min {_fmt(s['min_sqnr_db'], 1)} dB, mean "
                f"{_fmt(s['mean_sqnr_db'], 1)} dB{exact}; max error {s['max_block_rel_err']:.4f} of block amax")
    if check == LOGITS:
        if LOGITS not in report.ran:
            return "not run (--logits)"
        if not report.logits:
            return "could not run"
        lg = report.logits
        return (f"cosine {lg['cosine']:.5f} (min {lg['min_cosine']:.4f}), top-1 {100 * lg['top1_agreement']:.1f} %, "
                f"KL {lg['kl']:.5f} over {lg['positions']} positions")
    return ""


def format_summary(report: VerifyReport) -> str:
    """The terminal summary: a table of checks, one of layers, then the failures."""
    lines = [f"mxconv verify {report.src} -> {report.dst}",
             f"recipe {report.recipe}, source {report.source_format}, mapping {report.mapping}", "",
             f"{'check':<10} {'result':<7} {'failures':>8}  details"]
    for c in CHECKS:
        ok = report.check_passed(c)
        result = "skip" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"{c:<10} {result:<7} {len(report.failures_of(c)):>8}  {check_detail(report, c)}")
    if report.layers:
        lines += ["", f"{'layer':<10} {'tensors':>7} {'min SQNR':>9} {'mean SQNR':>9} {'max err/amax':>12} "
                      f"{'clipped':>8} {'fails':>5}"]
        for s in report.layers:
            lines.append(f"{s.label:<10} {s.tensors:>7} {_fmt(s.min_sqnr_db, 1):>9} {_fmt(s.mean_sqnr_db, 1):>9} "
                         f"{s.max_block_rel_err:>12.4f} {s.saturated_fraction:>8.2g} {s.failures:>5}")
    if report.failures:
        lines += ["", f"failures ({len(report.failures)}):"]
        for c in CHECKS:
            fs = report.failures_of(c)
            lines += [f"  {f.describe()}" for f in fs[:_SHOWN_FAILURES]]
            if len(fs) > _SHOWN_FAILURES:
                lines.append(f"  [{c}] ... and {len(fs) - _SHOWN_FAILURES} more (see the JSON report)")
    lines += [f"note: {n}" for n in report.notes]
    where = f"; report: {', '.join(report.report_files)}" if report.report_files else ""
    lines += ["", f"{'PASSED' if report.passed else 'FAILED'}: {sum(1 for c in CHECKS if report.check_passed(c))} "
                  f"of {len(report.ran)} checks passed in {report.seconds:.1f} s{where}"]
    return "\n".join(lines)

