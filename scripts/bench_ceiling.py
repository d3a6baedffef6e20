"""`scripts/bench.py --ceiling`: mxconv's own ceiling, with no disk in the way.

The source sits in the page cache and every destination on tmpfs (/dev/shm, or --dest-dir), so
what is timed is mxconv itself. Rows, interleaved, each in its own process: `cp -r`, a parallel
copy (one `cp` per shard, all at once: what the machine's memory and cores allow), mxconv on the
CPU at several worker counts and on CUDA at several worker counts (and, with --compare, the same
rows from another checkout, e.g. the version before a change). For each row: wall time, GB/s of
input over the wall time and over mxconv's own conversion time (without Python, torch and CUDA
start-up), the ratio to the parallel copy's rate, peak RSS, CPU seconds. Outputs of every
mxconv row must be byte-identical (sha256 over 256 MB chunks, hashed in parallel).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench  # noqa: E402  (scripts/ is on sys.path when bench.py runs)
import bench_report  # noqa: E402
import bench_sources  # noqa: E402

from converter.files import INDEX_FILE  # noqa: E402

_CHUNK = 256 << 20


def chunked_digest(dst: Path) -> str:
    """sha256 of the sha256s of every 256 MB chunk of the output tensor files, in name order."""
    files = sorted(dst.glob("*.safetensors"))
    chunks = [(p, at) for p in files for at in range(0, max(1, p.stat().st_size), _CHUNK)]

    def one(item) -> bytes:
        p, at = item
        with open(p, "rb", buffering=0) as f:
            f.seek(at)
            return hashlib.sha256(f.read(_CHUNK)).digest()

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return hashlib.sha256(b"".join(pool.map(one, chunks))).hexdigest()


def plan_rows(args, cuda: bool, gpus: int) -> list[dict]:
    mx = ["-m", "converter.cli", "convert"] + (["--max-shard-size", args.max_shard_size] if args.max_shard_size else [])
    rows = [{"name": "cp -r", "kind": "cp"}, {"name": "parallel cp (one per shard)", "kind": "pcp"}]
    checkouts = [("", None, {}, [], False)]
    if args.compare:
        checkouts.append(("before: ", str(args.compare.resolve()), {}, [], False))
    for variant in filter(None, (args.variants or "").split(";")):  # name[@cuda]:VAR=VALUE,--flag,...
        name, _, items = variant.partition(":")
        name, cuda_only = name.removesuffix("@cuda"), name.endswith("@cuda")
        items = [kv for kv in items.split(",") if kv]
        flags = [kv for kv in items if kv.startswith("--")]
        env = dict(kv.split("=", 1) for kv in items if not kv.startswith("--"))
        cores = env.pop("CORES", None)
        if cores:  # a machine of that many cores: the parallel copy and mxconv's defaults, under taskset
            rows.append({"name": f"variant {name}: parallel cp", "kind": "pcp", "cores": cores})
            rows.append({"name": f"variant {name}: mxconv cpu, default workers", "kind": "mxconv", "env": env,
                         "argv": mx + flags + ["--device", "cpu"], "device": "cpu", "cores": cores})
            continue
        checkouts.append((f"variant {name}: ", None, env, flags, cuda_only))
    for label, path, env, extra, cuda_only in checkouts:  # extra: convert flags
        cpu_w, gpu_w = ([] if cuda_only else args.workers), args.gpu_worker_list
        if label:  # another checkout or a variant: the fewest and the most workers only
            cpu_w = sorted({min(cpu_w), max(cpu_w)}) if cpu_w else []
            gpu_w = sorted({min(gpu_w), max(gpu_w)})
        for w in cpu_w:
            rows.append({"name": f"{label}mxconv cpu, {w} workers", "kind": "mxconv", "pythonpath": path, "env": env,
                         "argv": mx + extra + ["--device", "cpu", "--workers", str(w)], "device": "cpu", "workers": w})
        if cuda:
            for w in gpu_w:
                rows.append({"name": f"{label}mxconv cuda ({gpus} GPU), {w} workers", "kind": "mxconv",
                             "pythonpath": path, "env": env, "argv": mx + extra + ["--device", "cuda", "--workers", str(w)],
                             "device": "cuda", "workers": w})
    return rows


def shard_size(argv: list[str]) -> str:
    """The --max-shard-size a row's mxconv runs with (the last one given; "" for the default)."""
    size = ""
    for i, a in enumerate(argv):
        if a == "--max-shard-size" and i + 1 < len(argv):
            size = argv[i + 1]
        elif a.startswith("--max-shard-size="):
            size = a.split("=", 1)[1]
    return size


def run_row(row: dict, src: Path, dst: Path, timed) -> dict:
    # CORES=0-3 (a variant's): the row runs on those CPUs only, as on a machine of that many cores
    on = ["taskset", "-c", row["cores"]] if row.get("cores") else []
    if row["kind"] == "cp":
        return timed(["cp", "-r", str(src), str(dst)], sync=False)
    if row["kind"] == "pcp":
        script = 'mkdir -p "$2" && for f in "$1"/*; do cp "$f" "$2"/ & done; wait'
        return timed([*on, "sh", "-c", script, "pcp", str(src), str(dst)], sync=False)
    return timed([*on, sys.executable, *row["argv"], str(src), str(dst), "-q"], env=_env(row), sync=False)


def _env(row: dict) -> dict:
    """The environment of a row's mxconv: its variables, and its checkout first on the path."""
    env = dict(os.environ, **row.get("env", {}))
    path = row.get("pythonpath") or bench._PYTHONPATH
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    return env


def summarize(rows: dict[str, list[dict]], weight_bytes: int) -> list[dict]:
    pcp = statistics.median(r["wall_s"] for r in rows["parallel cp (one per shard)"] if r["returncode"] == 0)
    out = []
    for name, runs in rows.items():
        row = bench_report.measured(name, runs)
        if "error" not in row:
            wall, conv = row["wall_s"], row["convert_s"]
            row.update(wall_s=round(wall, 2), gb_per_s_wall=round(weight_bytes / wall / 1e9, 2),
                       convert_s=round(conv, 2) if conv else None,
                       gb_per_s_convert=round(weight_bytes / conv / 1e9, 2) if conv else None,
                       x_parallel_cp_rate=round(pcp / wall, 2),
                       x_parallel_cp_rate_convert=round(pcp / conv, 2) if conv else None)
        out.append(row)
    return out


def targets(precision: str, summary: list[dict]) -> list[str]:
    """Issue 16's targets, against this run (rows of this checkout, not --compare's)."""
    by = {s["name"]: s for s in summary if "error" not in s and s["name"].startswith("mxconv")}
    cpu = {int(n.split(", ")[1].split()[0]): s for n, s in by.items() if n.startswith("mxconv cpu")}
    gpu = {int(n.split(", ")[-1].split()[0]): s for n, s in by.items() if n.startswith("mxconv cuda")}
    out = []
    mx = list(cpu.values()) + list(gpu.values())
    if not mx:
        return out
    best = max(mx, key=lambda s: s["gb_per_s_wall"])
    for key, what in (("wall", "wall time"), ("convert", "conversion time")):
        rate = best[f"gb_per_s_{key}"] or 0
        ratio = best[f"x_parallel_cp_rate{'_convert' if key == 'convert' else ''}"] or 0
        out.append(f"{precision}: best {rate:.2f} GB/s of input over {what} ({best['name']}): "
                   f">= 8 {'met' if rate >= 8 else 'NOT met'}; {ratio:.0%} of the parallel copy's rate: "
                   f">= 80% {'met' if ratio >= 0.8 else 'NOT met'}")
    if 4 in cpu and 16 in cpu:
        x = cpu[4]["wall_s"] / cpu[16]["wall_s"]
        xc = (cpu[4]["convert_s"] or 0) / (cpu[16]["convert_s"] or 1)
        out.append(f"{precision}: 16 CPU workers {x:.2f}x the rate of 4 (wall), {xc:.2f}x (conversion): >= 2.5 "
                   f"{'met' if x >= 2.5 else 'met on conversion time only' if xc >= 2.5 else 'NOT met'}")
    if cpu and gpu:
        slower = [w for w in gpu if w in cpu and gpu[w]["wall_s"] > cpu[w]["wall_s"] * 1.05]
        fastest_cpu = min(s["wall_s"] for s in cpu.values())
        fastest_gpu = min(s["wall_s"] for s in gpu.values())
        out.append(f"{precision}: CUDA never slower than CPU at the same worker count (5% noise): "
                   f"{'met' if not slower else 'NOT met at ' + str(slower)}; best CUDA {fastest_gpu:.2f} s, "
                   f"best CPU {fastest_cpu:.2f} s")
    if len(gpu) > 1:
        ws = sorted(gpu)
        worse = [w for a, w in zip(ws, ws[1:]) if gpu[w]["wall_s"] > gpu[a]["wall_s"] * 1.05]
        out.append(f"{precision}: more GPU workers never slower (5% noise): "
                   f"{'met' if not worse else 'NOT met at ' + str(worse)}")
    return out


def warm_up(rows: list[dict], src: Path, dst: Path, timed) -> None:
    """Untimed, before the first row: the source read into the page cache; as many tmpfs pages as
    an output takes, written once and freed (in a fresh VM a guest page's first write also faults
    on the host, and only the first row would pay for that); each checkout's compiled kernels
    built (`native.load()`: a build takes a second or two, once per machine)."""
    bench._warm(src)
    run_row({"kind": "pcp"}, src, dst, timed)
    shutil.rmtree(dst, ignore_errors=True)
    for path in {r.get("pythonpath") for r in rows if r["kind"] == "mxconv"}:
        timed([sys.executable, "-c", "from converter.numerics import native; native.load()"],
              env=_env({"pythonpath": path}), sync=False)


def ceiling(args, timed) -> int:
    import torch

    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    config = dict(bench_sources.QUICK_CONFIG if args.quick else bench_sources.FULL_CONFIG)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    workdir = (args.workdir or Path(tempfile_dir())).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dest_root = Path(args.dest_dir).resolve()
    made_dest = not dest_root.exists()
    dest_root.mkdir(parents=True, exist_ok=True)
    dst = dest_root / "dst"
    report = {"machine": bench.machine(), "mode": "ceiling: source in the page cache, destination on "
              f"{dest_root} ({'tmpfs' if _is_tmpfs(dest_root) else 'NOT tmpfs'})", "repeats": args.repeats,
              "config": {k: config[k] for k in ("hidden_size", "n_routed_experts", "num_hidden_layers",
                                                "vocab_size")}, "precisions": {}}
    print(f"bench --ceiling: sources in {workdir}, destinations in {dest_root}", flush=True)
    try:
        for precision in args.precisions.split(","):
            src = workdir / f"src-{precision}" / f"{'quick' if args.quick else 'full'}-{config['num_hidden_layers']}"
            if (src / INDEX_FILE).exists():
                facts = bench_sources.source_facts(src)
            else:
                t = time.perf_counter()
                facts = bench_sources.build_source(src, config, precision, args.shards)
                print(f"bench: built {precision} source, {facts['weight_bytes'] / 1e9:.2f} GB in {facts['shards']} "
                      f"shards, in {time.perf_counter() - t:.0f} s", flush=True)
            rows = plan_rows(args, cuda, gpus)
            warm_up(rows, src, dst, timed)
            runs: dict[str, list[dict]] = {r["name"]: [] for r in rows}
            digests: dict[str, str] = {}
            layouts: dict[str, str] = {}  # rows with another --max-shard-size split the same bytes otherwise
            for rep in range(args.repeats):
                for r in rows:
                    if dst.exists():
                        shutil.rmtree(dst)
                    res = run_row(r, src, dst, timed)
                    if res["returncode"] == 0 and r["kind"] == "mxconv" and rep == 0:
                        digests[r["name"]] = chunked_digest(dst)
                        layouts[r["name"]] = shard_size(r["argv"])
                    runs[r["name"]].append(res)
                    status = f"{res['wall_s']:.2f} s" if res["returncode"] == 0 else \
                        f"FAILED: {(res['stderr'].strip().splitlines() or ['?'])[-1][:200]}"
                    print(f"bench: {precision} {r['name']}: {status}", flush=True)
            if dst.exists():
                shutil.rmtree(dst)
            summary = summarize(runs, facts["weight_bytes"])
            report["precisions"][precision] = {
                "source": facts, "runs": runs, "summary": summary, "digests": digests,
                "outputs_identical_across_devices_and_workers": all(
                    len({d for n, d in digests.items() if layouts[n] == size}) == 1 for size in set(layouts.values())),
                "shard_sizes": sorted(set(layouts.values())),
                "targets": targets(precision, summary)}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        if made_dest:
            with contextlib.suppress(OSError):  # left alone if anything else is in it
                dest_root.rmdir()
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
          + (f", {', '.join(m['gpus'])}" if m["gpus"] else "") + f"; torch {m['torch']}; {report['mode']}; "
          f"median of {args.repeats}")
    for precision, r in report["precisions"].items():
        f = r["source"]
        print(f"\n{precision.upper()} source: {f['weight_bytes'] / 1e9:.2f} GB in {f['shards']} shards")
        print(f"{'':40s} {'wall s':>7s} {'GB/s':>6s} {'conv s':>7s} {'GB/s':>6s} {'x pcp':>6s} {'RSS GB':>7s} {'CPU s':>6s}")
        for s in r["summary"]:
            if "error" in s:
                print(f"{s['name']:40s} failed: {s['error'][:80]}")
                continue
            conv = f"{s['convert_s']:7.2f} {s['gb_per_s_convert']:6.2f}" if s["convert_s"] else f"{'':7s} {'':6s}"
            print(f"{s['name']:40s} {s['wall_s']:7.2f} {s['gb_per_s_wall']:6.2f} {conv} {s['x_parallel_cp_rate']:6.2f} "
                  f"{s['peak_rss_gb']:7.2f} {s['cpu_s']:6.1f}")
        within = f" (rows of each of {len(r['shard_sizes'])} shard sizes compared)" if len(r["shard_sizes"]) > 1 else ""
        print(f"  outputs byte-identical across mxconv rows{within}: "
              f"{'yes' if r['outputs_identical_across_devices_and_workers'] else 'NO: ' + json.dumps(r['digests'])}")
        for line in r["targets"]:
            print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mxconv-ceiling-")


def _is_tmpfs(path: Path) -> bool:
    from converter.run.direct_io import in_memory_fs

    return in_memory_fs(path)
