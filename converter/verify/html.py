"""The `mxconv verify --html` page: one self-contained file (inline CSS and SVG, no scripts, no
external assets) with the checks, per-layer plots of SQNR and error, per-tensor SQNR, and every
failure. Plots are drawn here as SVG so no plotting library is needed."""

from __future__ import annotations

import math
from html import escape

from converter.verify.checks import CHECKS
from converter.verify.report import VerifyReport, check_detail

_W, _H = 720, 260  # plot size in px
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 64, 16, 28, 44
_KIND_COLORS = {"attention": "#4477aa", "dense MLP": "#228833", "routed experts": "#ee6677",
                "shared experts": "#ccbb44", "other": "#888888"}
_MAX_ROWS = 1000

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555}.meta code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;color:#fff}
.pass{background:#2e7d32}.fail{background:#c62828}.skip{background:#888}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border-bottom:1px solid #eee;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#fafafa}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.tensor{font-family:ui-monospace,Menlo,monospace;font-size:12px;word-break:break-all}
tr.bad td{background:#fff3f3}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:140px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#666;font-size:12px}
svg{background:#fff;border:1px solid #e5e5e5;border-radius:4px;margin:4px 0}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.note{color:#666;font-size:12px}
"""


def _kind(module: str) -> str:
    if module.startswith("self_attn."):
        return "attention"
    if ".experts." in f".{module}.":
        return "routed experts"
    if "shared_experts" in module:
        return "shared experts"
    if module.startswith("mlp."):
        return "dense MLP"
    return "other"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = (start + i * step for i in range(int((hi - start) / step) + 2))
    return [t for t in ticks if lo - 1e-12 <= t <= hi + 1e-12]


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or abs(v) < 0.01:
        return f"{v:.2g}" if abs(v) < 0.01 else f"{v:.0f}"
    return f"{v:.3g}"


def svg_chart(title: str, y_label: str, x_labels: list[str], series: list[tuple[str, str, list]],
              threshold: tuple[str, float] | None = None, lines: bool = True) -> str:
    """A categorical-x chart. series: (name, color, values) with one value (or None) per x label;
    values may also be (x index, y, tooltip) triples for scatter plots."""
    points = []
    for name, color, values in series:
        pts = [v if isinstance(v, tuple) else (i, v, f"{name} {x_labels[i]}: {v:.4g}" if v is not None else "")
               for i, v in enumerate(values)]
        points.append((name, color, [p for p in pts if p[1] is not None and math.isfinite(p[1])]))
    ys = [p[1] for _, _, pts in points for p in pts] + ([threshold[1]] if threshold else [])
    if not ys:
        return f'<p class="note">{escape(title)}: nothing to plot (every weight is exact).</p>'
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = (lo - pad if lo < 0 else max(lo - pad, 0.0)), hi + pad  # no negative axis for non-negative data
    n = max(len(x_labels), 1)
    iw, ih = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def sx(i: float) -> float:
        return _PAD_L + (i + 0.5) * iw / n

    def sy(v: float) -> float:
        return _PAD_T + (hi - v) / (hi - lo) * ih

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
           f'role="img" aria-label="{escape(title)}">',
           f'<text x="{_PAD_L}" y="18" font-size="13" font-weight="600">{escape(title)}</text>',
           f'<text x="14" y="{_PAD_T + ih / 2}" font-size="11" transform="rotate(-90 14 {_PAD_T + ih / 2})" '
           f'text-anchor="middle">{escape(y_label)}</text>']
    for t in _ticks(lo, hi):
        y = sy(t)
        out.append(f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{_PAD_L - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt_tick(t)}</text>')
    every = max(1, math.ceil(n / 30))
    for i, label in enumerate(x_labels):
        if i % every == 0:
            out.append(f'<text x="{sx(i):.1f}" y="{_H - _PAD_B + 16}" font-size="11" text-anchor="middle">'
                       f'{escape(label)}</text>')
    out.append(f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{_PAD_T + ih}" y2="{_PAD_T + ih}" stroke="#999"/>'
               f'<line x1="{_PAD_L}" x2="{_PAD_L}" y1="{_PAD_T}" y2="{_PAD_T + ih}" stroke="#999"/>')
    if threshold:
        y = sy(threshold[1])
        out.append(f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c62828" '
                   f'stroke-dasharray="6 4"><title>{escape(threshold[0])}</title></line>'
                   f'<text x="{_W - _PAD_R - 4}" y="{y - 4:.1f}" font-size="11" fill="#c62828" '
                   f'text-anchor="end">{escape(threshold[0])}</text>')
    for _, color, pts in points:
        if lines and len(pts) > 1:
            path = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v, _ in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for i, v, tip in pts:
            out.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="{3 if lines else 2.5}" fill="{color}">'
                       f'<title>{escape(tip)}</title></circle>')
    out.append(f'<text x="{_PAD_L + iw / 2}" y="{_H - 8}" font-size="11" text-anchor="middle">'
               f'{"layer" if lines else "tensor (in name order)"}</text></svg>')
    legend = "".join(f'<span><i style="background:{c}"></i>{escape(nm)}</span>' for nm, c, _ in series)
    return "\n".join(out) + f'<div class="legend">{legend}</div>'


def _badge(ok: bool | None, not_checked: bool = False) -> str:
    cls, text = ("skip", "not run") if ok is None else ("pass", "PASS") if ok else ("fail", "FAIL")
    if ok is None and not_checked:
        cls, text = "fail", "NOT CHECKED"
    return f'<span class="badge {cls}">{text}</span>'


def _num(v, digits: int = 2, exact: str = "exact") -> str:
    if v is None or (isinstance(v, float) and math.isinf(v) and v > 0):
        return exact
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_html(report: VerifyReport) -> str:
    t = report.thresholds
    s = report.summary()
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mxconv verify: "
             f"{escape(report.dst.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>mxconv verify {_badge(report.passed)}</h1>",
             f'<p class="meta">source <code>{escape(str(report.src))}</code> &rarr; destination '
             f'<code>{escape(str(report.dst))}</code><br>recipe <code>{escape(str(report.recipe))}</code>, source '
             f'format <code>{escape(str(report.source_format))}</code>, mapping <code>{escape(str(report.mapping))}'
             f'</code>, {report.seconds:.1f} s</p>']
    cards = [("MXFP8 weights", str(s["tensors"])), ("min SQNR", f"{_num(s['min_sqnr_db'], 1)} dB"),
             ("mean SQNR", f"{_num(s['mean_sqnr_db'], 1)} dB"),
             ("max error / block amax", _num(s["max_block_rel_err"], 4, "n/a")),
             ("failures", str(len(report.failures)))]
    if report.logits:
        lg = report.logits
        cards += [("logits cosine", f"{lg['cosine']:.4f}"), ("top-1 agreement", f"{100 * lg['top1_agreement']:.1f} %"),
                  ("KL", f"{lg['kl']:.4f}")]
    cells = "".join(f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
                    for k, v in cards)
    parts.append(f'<div class="cards">{cells}</div>')
    parts.append("<h2>Checks</h2><table><tr><th>check</th><th>result</th><th>failures</th><th>details</th></tr>")
    for c in CHECKS:
        badge = _badge(report.check_passed(c), report.result(c) == "NOT CHECKED")
        parts.append(f"<tr><td>{c}</td><td>{badge}</td><td class=\"num\">"
                     f"{len(report.failures_of(c))}</td><td>{escape(check_detail(report, c))}</td></tr>")
    parts.append("</table>")
    parts.append(_failures_table(report))
    parts.append(_layer_plots(report))
    parts.append(_tensor_plot(report))
    parts.append(_layer_table(report))
    parts.append(_worst_table(report))
    parts.append(f'<h2>Thresholds</h2><p class="note">per MXFP8 weight: SQNR &ge; {t.min_sqnr_db} dB, max |error| '
                 f'&le; {t.max_block_rel_err:.4f} of its 1x32 block amax, clipped fraction &le; '
                 f'{t.max_saturated_fraction}, non-zero blocks stored as zeros &le; {t.max_lost_blocks}; UE8M0 '
                 f're-layout exact. Logits: mean cosine &ge; {t.min_cosine}, top-1 agreement &ge; '
                 f'{t.min_top1_agreement}, mean KL &le; {t.max_kl}.</p>')
    parts += [f'<p class="note">note: {escape(n)}</p>' for n in report.notes]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _failures_table(report: VerifyReport) -> str:
    if not report.failures:
        return "<h2>Failures</h2><p>None.</p>"
    rows = [f"<h2>Failures ({len(report.failures)})</h2><table><tr><th>check</th><th>tensor / file</th>"
            "<th>message</th></tr>"]
    order = {c: i for i, c in enumerate(CHECKS)}
    for f in sorted(report.failures, key=lambda f: order.get(f.check, len(order)))[:_MAX_ROWS]:
        where = f.tensor or (f.file or "")
        rows.append(f'<tr class="bad"><td>{f.check}</td><td class="tensor">{escape(where)}</td>'
                    f"<td>{escape(f.message)}</td></tr>")
    rows.append("</table>")
    if len(report.failures) > _MAX_ROWS:
        rows.append(f'<p class="note">{len(report.failures) - _MAX_ROWS} more in the JSON report.</p>')
    return "\n".join(rows)


def _layer_plots(report: VerifyReport) -> str:
    layers = report.layers
    if not layers:
        return "<h2>Per-layer numerics</h2><p>No MXFP8 weights.</p>"
    labels = [layer.label for layer in layers]
    t = report.thresholds
    sqnr = svg_chart("SQNR per layer (higher is better)", "dB", labels,
                     [("min SQNR", "#c44e52", [x.min_sqnr_db for x in layers]),
                      ("mean SQNR", "#4c72b0", [x.mean_sqnr_db for x in layers])],
                     threshold=(f"threshold {t.min_sqnr_db} dB", t.min_sqnr_db))
    rel = svg_chart("max |error| / block amax per layer (lower is better)", "fraction of amax", labels,
                    [("max error / block amax", "#dd8452", [x.max_block_rel_err for x in layers])],
                    threshold=(f"threshold {t.max_block_rel_err:.4f}", t.max_block_rel_err))
    abs_err = svg_chart("max |error| per layer", "absolute", labels,
                        [("max |error|", "#55a868", [x.max_abs_err for x in layers])])
    return f"<h2>Per-layer numerics</h2>{sqnr}\n{rel}\n{abs_err}"


def _tensor_plot(report: VerifyReport) -> str:
    tensors = report.tensors
    if not tensors:
        return ""
    series = []
    for kind, color in _KIND_COLORS.items():
        pts = [(i, n.sqnr_db, f"{n.name}: {_num(n.sqnr_db)} dB") for i, n in enumerate(tensors)
               if _kind(n.module) == kind]
        if pts:
            series.append((kind, color, pts))
    chart = svg_chart("SQNR per MXFP8 weight", "dB", [""] * len(tensors), series,
                      threshold=(f"threshold {report.thresholds.min_sqnr_db} dB", report.thresholds.min_sqnr_db),
                      lines=False)
    return f"<h2>Per-tensor SQNR</h2>{chart}"


def _layer_table(report: VerifyReport) -> str:
    if not report.layers:
        return ""
    rows = ["<h2>Per-layer summary</h2><table><tr><th>layer</th><th>MXFP8 weights</th><th>min SQNR (dB)</th>"
            "<th>mean SQNR (dB)</th><th>max |error|</th><th>max error / amax</th><th>clipped</th><th>failing</th></tr>"]
    for x in report.layers:
        cls = ' class="bad"' if x.failures else ""
        rows.append(f"<tr{cls}><td>{escape(x.label)}</td><td class=\"num\">{x.tensors}</td>"
                    f"<td class=\"num\">{_num(x.min_sqnr_db)}</td><td class=\"num\">{_num(x.mean_sqnr_db)}</td>"
                    f"<td class=\"num\">{x.max_abs_err:.3g}</td><td class=\"num\">{x.max_block_rel_err:.4f}</td>"
                    f"<td class=\"num\">{x.saturated_fraction:.2g}</td><td class=\"num\">{x.failures}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _worst_table(report: VerifyReport, count: int = 15) -> str:
    if not report.tensors:
        return ""
    worst = sorted(report.tensors, key=lambda n: (not n.problems, n.sqnr_db))[:count]
    rows = [f"<h2>Worst {len(worst)} weights</h2><table><tr><th>tensor</th><th>stored as</th><th>SQNR (dB)</th>"
            "<th>max |error|</th><th>max error / amax</th><th>clipped</th><th>zero blocks</th><th>problems</th></tr>"]
    for n in worst:
        cls = ' class="bad"' if n.problems else ""
        stored = "" if n.stored_as == n.name else n.stored_as
        rows.append(f"<tr{cls}><td class=\"tensor\">{escape(n.name)}</td><td class=\"tensor\">{escape(stored)}</td>"
                    f"<td class=\"num\">{_num(n.sqnr_db)}</td><td class=\"num\">{n.max_abs_err:.3g}</td>"
                    f"<td class=\"num\">{n.max_block_rel_err:.4f}</td><td class=\"num\">{n.saturated_fraction:.2g}</td>"
                    f"<td class=\"num\">{n.zero_blocks}</td><td>{escape('; '.join(n.problems))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)
