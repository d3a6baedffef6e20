"""The result of `mxconv verify`: the report (checks, failures, per-tensor and per-layer numerics),
its JSON form, and the terminal summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from converter.verify.checks import BYTES, CHECKS, CONFIG, COVERAGE, LOGITS, NUMERICS, Failure
from converter.verify.jobs import TensorNumerics, Thresholds
from converter.version import __version__

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
    # checks that ran but found nothing in DST they could check (an interrupted conversion): never PASS
    unchecked: set[str] = field(default_factory=set)
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
        """None when the check did not run, or ran without a failure but had nothing to check."""
        if check not in self.ran:
            return None
        if any(f.check == check for f in self.failures):
            return False
        return None if check in self.unchecked else True

    @property
    def passed(self) -> bool:
        return all(self.check_passed(c) is not False for c in CHECKS) and not self.unchecked

    def result(self, check: str) -> str:
        """PASS, FAIL, NOT CHECKED (ran, nothing to check) or skip (did not run)."""
        ok = self.check_passed(check)
        if ok is None:
            return "NOT CHECKED" if check in self.ran else "skip"
        return "PASS" if ok else "FAIL"

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
                      "checked": c in self.ran and c not in self.unchecked,
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
        expected = d.get("expected", s["tensors"])
        if not s["tensors"]:
            return f"none of the {expected} MXFP8 weights measurable in DST" if expected else "no MXFP8 weights"
        exact = f", {s['exact_tensors']} exact" if s["exact_tensors"] else ""
        of = f" of {expected}" if expected != s["tensors"] else ""
        return (f"{s['tensors']}{of} MXFP8 weights: SQNR min {_fmt(s['min_sqnr_db'], 1)} dB, mean "
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
             f"{'check':<10} {'result':<11} {'failures':>8}  details"]
    for c in CHECKS:
        lines.append(f"{c:<10} {report.result(c):<11} {len(report.failures_of(c)):>8}  {check_detail(report, c)}")
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
