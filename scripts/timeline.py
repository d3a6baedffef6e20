#!/usr/bin/env python
"""When each conversion process does its work: a timeline of a multi-process run, seen from the
parent (what `profile_pipeline.py` cannot see: it times the stages of one process).

Runs one conversion as `mxconv convert` does (the warm processes, the early source hash, then
`convert`), recording when each process is sent its job, when it first reports reading a file,
every byte of progress it reports, and when it says it is done, when its imports were done
(ready_s: negative if before the conversion began), and when the source hash ran;
then prints as JSON, in seconds from the moment the conversion began (`write_shards`):

    planning_s          from this script's start to the conversion's: start-up and planning
    ramp_s              until the first progress (the processes opening the source, first pieces)
    steady_gb_per_s     the rate between 10 % and 90 % of the bytes (t10_s, t90_s), against
                        overall_gb_per_s, the whole conversion's
    first/last_done_s   the first and the last process done; convert_tail_s, from the end of the
                        conversion to the end of `convert` (hashes, index, config, provenance)
    hash_s              when the source hash began and ended (before 0: during the start-up)
    warm_up_s           when the processes were started, and imported_s when this process's imports
                        were done (torch, the pipeline): both before 0
    gb_done_every_100ms the curve; and for each process its job, first read, first and last
                        progress and done times; peak RSS of the parent and the largest process

so a conversion slower than its steady rate says where the rest went.

    python scripts/timeline.py SRC DST --workers 16 [--no-source-hash] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

# the checkout this script sits in first, whatever is installed: a copy of the script in another
# checkout times that checkout (its processes get this sys.path too)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from profile_pipeline import report  # noqa: E402  (this folder is on the path: the script's own)

T0 = time.perf_counter()
EVENTS: list[tuple[float, object, str, int]] = []  # (seconds since T0, the process's _Child, kind, bytes)
PROGRESS: list[tuple[float, int]] = []  # (seconds since T0, bytes): all processes together
HASHED: list[tuple[float, float]] = []  # (start, end) of each source file's sha256, since T0
_child_of: dict[int, object] = {}  # id(connection) -> its _Child (its pid is looked up at the end:
# a forked one's pid is known only once the zygote has exited, and asking would wait for that)


def instrument() -> None:
    from converter.run import processes
    from converter.sources import hashing

    begin, record, began = hashing.SourceHasher._begin, hashing.SourceHasher._record, {}

    def timed_begin(self, path, ahead):  # a file's hash begins (either way it is hashed)...
        go = begin(self, path, ahead)
        if go:
            began[path] = time.perf_counter() - T0
        return go

    def timed_record(self, path, digest):  # ...and ends with its digest recorded
        HASHED.append((began.pop(path, 0.0), time.perf_counter() - T0))
        return record(self, path, digest)

    hashing.SourceHasher._begin, hashing.SourceHasher._record = timed_begin, timed_record

    tell, recv = processes._Child.tell, Connection.recv

    def timed_tell(self, message):
        _child_of[id(self.conn)] = self
        if isinstance(message, dict):
            EVENTS.append((time.perf_counter() - T0, self, "job", 0))
        return tell(self, message)

    def timed_recv(self):
        message = recv(self)
        if id(self) in _child_of and isinstance(message, tuple) and message:
            nbytes = message[1] if message[0] == "progress" else 0
            # "ready" says when it was sent: perf_counter is CLOCK_MONOTONIC in every process
            at = message[1] if message[0] == "ready" else time.perf_counter()
            EVENTS.append((at - T0, _child_of[id(self)], message[0], nbytes))
        return message

    processes._Child.tell, Connection.recv = timed_tell, timed_recv


def _at_fraction(progress: list[tuple[float, int]], fraction: float, total: int) -> float:
    done = 0
    for t, n in progress:
        done += n
        if done >= fraction * total:
            return t
    return progress[-1][0] if progress else 0.0


def summarize(began: float, ended: float, finished: float, total: int) -> dict:
    rel = [(t - began, child.proc.pid, kind, n) for t, child, kind, n in EVENTS]
    pids = sorted({pid for _, pid, _, _ in rel})
    progress = [(t - began, n) for t, n in PROGRESS]
    per = {}
    for pid in pids:
        mine = [(t, kind, n) for t, p, kind, n in rel if p == pid]
        first = {kind: min((t for t, k, _ in mine if k == kind), default=None)
                 for kind in ("ready", "job", "reading", "progress", "done")}
        last_progress = max((t for t, k, _ in mine if k == "progress"), default=None)
        per[pid] = {"ready_s": first["ready"], "job_s": first["job"], "first_reading_s": first["reading"],
                    "first_progress_s": first["progress"],
                    "last_progress_s": last_progress, "done_s": first["done"],
                    "bytes": sum(n for _, k, n in mine if k == "progress")}
    t10, t90 = _at_fraction(progress, 0.1, total), _at_fraction(progress, 0.9, total)
    dones = [p["done_s"] for p in per.values() if p["done_s"] is not None]
    conversion = ended - began
    curve, done, k = [], 0, 0
    for step in range(1, int(conversion / 0.1) + 2):  # input bytes done every 0.1 s
        while k < len(progress) and progress[k][0] <= step * 0.1:
            done += progress[k][1]
            k += 1
        curve.append(round(done / 1e9, 2))
    return {
        "input_gb": round(total / 1e9, 3),
        "gb_done_every_100ms": curve,
        "hash_s": [round(min((a for a, _ in HASHED), default=began) - began, 3),
                   round(max((b for _, b in HASHED), default=began) - began, 3)],  # first start, last end
        "hashed_files": len(HASHED),
        "planning_s": round(began, 3),  # since this script began: imports, the plan
        "conversion_s": round(conversion, 3),  # write_shards alone
        "convert_tail_s": round(finished - ended, 3),  # after write_shards: hashes, index, config, provenance
        "ramp_s": round(progress[0][0], 3) if progress else None,  # until the first progress
        "t10_s": round(t10, 3), "t90_s": round(t90, 3),
        "steady_gb_per_s": round(0.8 * total / max(t90 - t10, 1e-9) / 1e9, 2),
        "overall_gb_per_s": round(total / conversion / 1e9, 2),
        "first_done_s": round(min(dones), 3) if dones else None,
        "last_done_s": round(max(dones), 3) if dones else None,
        "processes": {str(pid): {k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}
                      for pid, p in per.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--no-source-hash", action="store_true")
    ap.add_argument("--json", type=Path, help="append the summary here, one line per run")
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep the output (default: removed after the run)")
    args = ap.parse_args()
    if Path(args.dst).exists():
        shutil.rmtree(args.dst)
    instrument()
    from converter.run import processes

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    marks: dict[str, float] = {"warm_up": time.perf_counter() - T0}
    processes.warm_up(processes.process_count("cpu", args.workers), "cpu", args.workers)
    if not args.no_source_hash:
        from converter.sources.hashing import start_early

        start_early(args.src)
    from converter.run import pipeline

    marks["imported"] = time.perf_counter() - T0
    write_shards = pipeline.write_shards

    def timed_write_shards(todo, count, job, devices, progress, *a, **k):
        def timed_progress(nbytes: int) -> None:  # every process's, as the progress bar gets them
            PROGRESS.append((time.perf_counter() - T0, nbytes))
            progress(nbytes)

        marks["began"] = time.perf_counter() - T0
        try:
            return write_shards(todo, count, job, devices, timed_progress, *a, **k)
        finally:
            marks["ended"] = time.perf_counter() - T0

    pipeline.write_shards = timed_write_shards
    result = pipeline.convert(args.src, args.dst, workers=args.workers, max_shard_size=args.max_shard_size,
                              quiet=True, hash_sources=not args.no_source_hash)
    finished = time.perf_counter() - T0
    total = sum(j.input_bytes for s in result.plan.shards for j in s.jobs)
    rss = [resource.getrusage(who).ru_maxrss / 1e6 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out = {"label": args.label, "workers": args.workers, "max_shard_size": args.max_shard_size,
           "hash": not args.no_source_hash, "result_seconds": round(result.seconds, 3),
           "peak_rss_gb": {"parent": round(rss[0], 2), "largest_process": round(rss[1], 2)},
           "warm_up_s": round(marks["warm_up"] - marks["began"], 3),  # processes started (negative: before)
           "imported_s": round(marks["imported"] - marks["began"], 3),  # this process's imports done
           **summarize(marks["began"], marks["ended"], finished, total)}
    report(out, args.json, args.dst, indent=1, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
