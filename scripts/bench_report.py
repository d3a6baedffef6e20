"""`scripts/bench.py`'s report: each row's medians (wall, mxconv's own conversion time, GB/s of
input, ratio to `cp`, peak RSS, CPU), the printed table, and the issues' targets checked against
the run."""

from __future__ import annotations

import re
import statistics

CONVERT_TIME = re.compile(r" in ([0-9.]+) s \(")


def measured(name: str, runs: list[dict]) -> dict:
    """A row's successful runs: their count, walls and medians (wall; mxconv's own conversion
    time from its summary line, without Python/torch/CUDA start-up, None where it printed none;
    CPU), the peak RSS; or the last run's error where none succeeded."""
    ok = [r for r in runs if r["returncode"] == 0]
    if not ok:
        return {"name": name, "error": (runs[-1]["stderr"].strip().splitlines() or ["failed"])[-1]}
    inside = [float(m.group(1)) for r in ok if (m := CONVERT_TIME.search(r["stdout"]))]
    return {"name": name, "runs": len(ok), "wall_s": statistics.median(r["wall_s"] for r in ok),
            "walls": [r["wall_s"] for r in ok], "convert_s": statistics.median(inside) if inside else None,
            "peak_rss_gb": round(max(r["peak_rss_bytes"] for r in ok) / 1e9, 2),
            "cpu_s": statistics.median(r["cpu_s"] for r in ok)}


def summarize(rows: dict[str, list[dict]], facts: dict) -> list[dict]:
    cp = statistics.median(r["wall_s"] for r in rows["cp -r + sync"] if r["returncode"] == 0)
    out = []
    for name, runs in rows.items():
        row = measured(name, runs)
        if "error" not in row:
            wall, conv = row["wall_s"], row["convert_s"]
            row.update(wall_s=round(wall, 2), min_wall_s=min(row["walls"]), convert_s=round(conv, 2) if conv else None,
                       input_gb_per_s=round(facts["weight_bytes"] / wall / 1e9, 2), ratio_to_cp=round(wall / cp, 2))
        out.append(row)
    return out


def table(precision: str, facts: dict, summary: list[dict]) -> str:
    lines = [f"{precision.upper()} source: {facts['weight_bytes'] / 1e9:.2f} GB in {facts['shards']} shards "
             f"(largest {facts['largest_shard_bytes'] / 1e9:.2f} GB)",
             f"{'':52s} {'wall s':>7s} {'GB/s in':>8s} {'x cp':>6s} {'peak RSS GB':>12s} {'start+exit s':>13s}"]
    for s in summary:
        if "error" in s:
            lines.append(f"{s['name']:52s} failed: {s['error'][:80]}")
        else:
            startup = f"{s['wall_s'] - s['convert_s']:13.2f}" if s.get("convert_s") else f"{'':13s}"
            lines.append(f"{s['name']:52s} {s['wall_s']:7.2f} {s['input_gb_per_s']:8.2f} {s['ratio_to_cp']:6.2f} "
                         f"{s['peak_rss_gb']:12.2f} {startup}")
    return "\n".join(lines)


def targets(precision: str, facts: dict, summary: list[dict]) -> list[str]:
    """The issue's targets, checked against this run."""
    by = {s["name"]: s for s in summary if "error" not in s}
    cpu = [s for n, s in by.items() if n.startswith("mxconv cpu")]
    out = []
    if cpu:
        best = min(cpu, key=lambda s: s["wall_s"])
        out.append(f"{precision}: best CPU run {best['ratio_to_cp']:.2f} x cp (target <= 2.0): "
                   f"{'met' if best['ratio_to_cp'] <= 2.0 else 'NOT met'}")
        limit = facts["largest_shard_bytes"] / 1e9 + 2.0
        rss = max(s["peak_rss_gb"] for s in cpu)
        out.append(f"{precision}: peak RSS {rss:.2f} GB (target <= largest shard + 2 GB = {limit:.2f}): "
                   f"{'met' if rss <= limit else 'NOT met'}")
        llmc = next((s for n, s in by.items() if n.startswith("llm-compressor")), None)
        if llmc:
            speedup = llmc["wall_s"] / best["wall_s"]
            out.append(f"{precision}: {speedup:.1f} x faster than llm-compressor (target >= 5): "
                       f"{'met' if speedup >= 5 else 'NOT met'}")
    dcp = [s for n, s in by.items() if n.startswith("mxconv DCP")]
    two = next((s for n, s in by.items() if n.startswith("dcp_to_torch_save")), None)
    if dcp:
        best = min(dcp, key=lambda s: s["wall_s"])
        out.append(f"dcp: best mxconv run {best['ratio_to_cp']:.2f} x cp, peak RSS "
                   f"{max(s['peak_rss_gb'] for s in dcp):.2f} GB (chunks of {facts['largest_shard_bytes'] / 1e9:.2f} GB "
                   "files)")
        if two:
            out.append(f"dcp: {two['wall_s'] / best['wall_s']:.1f} x faster than dcp_to_torch_save + export + "
                       f"mxconv ({two['wall_s']:.1f} s, peak RSS {two['peak_rss_gb']:.2f} GB)")
    gpu = [s for n, s in by.items() if n.startswith("mxconv cuda")]
    if gpu:
        g = gpu[0]
        out.append(f"{precision}: CUDA {g['ratio_to_cp']:.2f} x cp (target <= 1.2 on one H100): "
                   f"{'met' if g['ratio_to_cp'] <= 1.2 else 'NOT met'}")
    return out
