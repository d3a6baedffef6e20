#!/usr/bin/env python
"""Where a conversion's time goes: a per-stage timeline of every piece, by thread.

Wraps the pipeline's stage functions (`load`, `compute`, the shard writer's writes and in-place
outputs, `finish`) with timers, runs one conversion in this process, and prints for each thread
group (readers, workers, writers, finisher) how many seconds it was busy in each stage and its
busiest thread's share of the wall time: a group near 100 % of the wall with one thread is a
serial ceiling. Works on this version of the pipeline and on the one before it (one reader and
one writer thread), so a profile can be taken before and after a change.

    python scripts/profile_pipeline.py SRC DST --workers 16 [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: profile any checkout

EVENTS: list[tuple[str, str, float, float]] = []  # (thread, stage, start, end)
_lock = threading.Lock()


def _timed(stage: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            with _lock:
                EVENTS.append((threading.current_thread().name, stage, t0, t1))
    return wrapper


def instrument() -> None:
    import converter.run.execute as ex
    from converter.run import writer

    for name, stage in (("load", "read"), ("compute", "compute")):
        setattr(ex, name, _timed(stage, getattr(ex, name)))
    for name, stage in (("write_rows", "write"), ("region", "map+populate"), ("finish", "finish"),
                        ("__enter__", "open")):
        if hasattr(writer.ShardWriter, name):
            setattr(writer.ShardWriter, name, _timed(stage, getattr(writer.ShardWriter, name)))
    if hasattr(ex, "SourceHasher"):
        pass


def _group(thread: str) -> str:
    for key, group in (("read", "readers"), ("work", "workers"), ("write", "writers"), ("finish", "finisher")):
        if key in thread:
            return group
    return "other"


def summarize(wall: float) -> dict:
    busy: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    per_thread: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for thread, stage, t0, t1 in EVENTS:
        busy[_group(thread)][stage] += t1 - t0
        per_thread[thread] += t1 - t0
        counts[stage] += 1
    groups = {}
    for g, stages in busy.items():
        threads = [t for t in per_thread if _group(t) == g]
        groups[g] = {"threads": len(threads), "busy_s": {k: round(v, 3) for k, v in sorted(stages.items())},
                     "busiest_thread_share_of_wall": round(max(per_thread[t] for t in threads) / wall, 3),
                     "mean_thread_share_of_wall": round(sum(per_thread[t] for t in threads) / len(threads) / wall, 3)}
    return {"wall_s": round(wall, 3), "groups": groups, "calls": dict(counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hash", action="store_true", help="skip the source sha256 (to see the pipeline alone)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep the output (default: removed after the run)")
    args = ap.parse_args()
    instrument()
    from converter.run.pipeline import convert

    if Path(args.dst).exists():
        shutil.rmtree(args.dst)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    result = convert(args.src, args.dst, device=args.device, workers=args.workers, quiet=True,
                     hash_sources=not args.no_hash)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(j.input_bytes for s in result.plan.shards for j in s.jobs)
    out = {"label": args.label, "device": args.device, "workers": args.workers, "input_gb": round(total / 1e9, 3),
           "gb_per_s": round(total / wall / 1e9, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
           "sys_s": round(r1.ru_stime - r0.ru_stime, 2), **summarize(wall)}
    report(out, args.json, args.dst, keep=args.keep)
    return 0


def report(out: dict, json_path: Path | None, dst: str, indent: int | None = None, keep: bool = False) -> None:
    """Print a run's summary, append it to `json_path` (one line per run) and remove its output
    (unless `keep`)."""
    print(json.dumps(out, indent=indent))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(out) + "\n")
    if not keep:
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
