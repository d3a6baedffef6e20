#!/usr/bin/env python
"""Benchmark: mxconv convert against `cp -r` (the physical limit) on a DeepSeek-V3-shaped checkpoint.

Builds BF16 and FP8 checkpoints with real DeepSeek V3 matrix dimensions, then times, in one run
and in the same page-cache state, `cp -r SRC DST && sync` and every conversion: mxconv on CPU
(1 and 2 workers), on CUDA when a GPU is present, the FlashInfer-layout recipe when it exists, and
llm-compressor's model-free MXFP8 path when it is installed. Each conversion runs in its own
subprocess, so its peak RSS is its own. Prints a table and writes JSON.

    python scripts/bench.py                  # full size: 5.6 GB BF16 + 3.2 GB FP8, 3 repeats
    python scripts/bench.py --quick          # small smoke run
    python scripts/bench.py --json out.json --workdir /big/disk --keep
    python scripts/bench.py --ceiling        # no disk in the way: page cache -> tmpfs (bench_ceiling.py)
    python scripts/bench.py --precisions dcp # Megatron torch_dist (DCP) source built from the BF16 one:
                                             # mxconv straight from it vs dcp_to_torch_save + export + mxconv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:  # the installed project (pip install -e . or pip install .), else the checkout itself
    import converter.configs  # noqa: F401
    _PYTHONPATH = None
except ImportError:
    sys.path.insert(0, str(REPO))
    _PYTHONPATH = str(REPO)

# Peak RSS is measured per run with wait4(). A child forked from this process would report this
# process's RSS (torch and all) as its own high-water mark, so every run is started by a small
# launcher process forked now, before torch is imported. wait4() gives the largest process's peak,
# not the sum over mxconv's conversion processes (run/processes.py), so the launcher also samples
# the process tree every 10 ms and reports the larger of the two: every process's anonymous and
# shared-memory pages, and the file pages (torch's libraries, mostly) of mxconv's own process once,
# since its conversion processes map the same files.
_LAUNCHER = r"""
import json, os, subprocess, sys, tempfile, threading, time

def tree_rss(pid):
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                kb = {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in f) if k.startswith("Rss")}
            total += 1024 * (kb["RssAnon"] + kb["RssShmem"] + (kb["RssFile"] if p == pid else 0))
            with open(f"/proc/{p}/task/{p}/children") as f:  # mxconv starts processes from its main thread
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, KeyError):
            pass
    return total

def sample(pid, peak, done):
    while not done.wait(0.01):
        peak[0] = max(peak[0], tree_rss(pid))

for line in sys.stdin:
    job = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["argv"], stdout=out, stderr=err, env=job["env"], cwd=job["cwd"])
        peak, done = [0], threading.Event()
        sampler = threading.Thread(target=sample, args=(proc.pid, peak, done))
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        if job["sync"]:
            subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - start
        out.seek(0); err.seek(0)
        print(json.dumps({"wall_s": round(wall, 3), "returncode": os.waitstatus_to_exitcode(status),
                          "peak_rss_bytes": max(usage.ru_maxrss * 1024, peak[0]), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                          "stdout": out.read().decode(errors="replace")[-2000:],
                          "stderr": err.read().decode(errors="replace")[-4000:]}), flush=True)
"""
_launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True) if __name__ == "__main__" else None

import torch  # noqa: E402
from bench_report import summarize, table, targets  # noqa: E402
from bench_peers import LLMC_DRIVER, TWO_STEP_DRIVER, find_llmc_python  # noqa: E402
from bench_sources import (FULL_CONFIG, QUICK_CONFIG, build_dcp_source, build_source, source_facts,  # noqa: E402
                           source_size)

from converter.files import INDEX_FILE  # noqa: E402

# ----------------------------------------------------------------------------- running things

def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _warm(src: Path) -> None:
    """Read the source once (untimed) so that every timed run starts with it in the page cache."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def _prepare(src: Path, dst: Path, drop: bool) -> None:
    """The same state before every timed run: no destination (its page cache freed), nothing
    dirty, the source in the page cache; with `drop`, nothing else cached either (then the
    source is read again, from disk: slow)."""
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    if drop:
        _drop_caches()
        _warm(src)


def _timed(argv: list[str], env: dict | None = None, sync: bool = True) -> dict:
    """Wall time, CPU time and peak RSS of one command run by the launcher, then a `sync`
    (timed, as for cp)."""
    # not from the checkout: `python -m` would import its converter/ ahead of the installed one
    job = {"argv": argv, "env": env or dict(os.environ), "cwd": tempfile.gettempdir(), "sync": sync}
    _launcher.stdin.write(json.dumps(job) + "\n")
    _launcher.stdin.flush()
    return json.loads(_launcher.stdout.readline())


def recipe_exists(name: str) -> bool:
    from converter.plan.recipe import builtin_recipes
    try:
        return name in builtin_recipes()
    except ImportError:  # a checkout that is not installed: the recipes are not a package yet
        sys.exit("bench: converter.configs cannot be imported; install the project first: "
                 "pip install -e .  (or pip install . --no-deps)")


def output_digest(dst: Path) -> str:
    """sha256 over the output tensor files, in name order (to check that variants agree)."""
    h = hashlib.sha256()
    for p in sorted(dst.glob("*.safetensors")):
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    # pip compiles bytecode at install; an environment without it (PYTHONDONTWRITEBYTECODE and no
    # __pycache__, as some container images) compiles torch's sources on every import: seconds
    info["torch_bytecode_cached"] = any((Path(torch.__file__).parent / "__pycache__").glob("__init__.*.pyc"))
    return info


def plan_runs(args, precision: str, llmc_python: str | None) -> list[dict]:
    """The rows of one precision: what to run and how to name it."""
    mx = [sys.executable, "-m", "converter.cli", "convert"]
    runs = [{"name": "cp -r + sync", "kind": "cp"}]
    if precision == "dcp":
        for w in args.workers:
            runs.append({"name": f"mxconv DCP -> MXFP8, cpu, {w} worker{'s' if w > 1 else ''}", "kind": "mxconv",
                         "argv": mx + ["--device", "cpu", "--workers", str(w)], "digest_group": "canonical"})
        w = max(args.workers)
        runs.append({"name": f"dcp_to_torch_save + HF export + mxconv ({w} workers)", "kind": "two-step",
                     "workers": w})
        return runs
    for w in args.workers:
        runs.append({"name": f"mxconv cpu, {w} worker{'s' if w > 1 else ''}", "kind": "mxconv",
                     "argv": mx + ["--device", "cpu", "--workers", str(w)], "digest_group": "canonical"})
    if args.cuda:
        n = torch.cuda.device_count()
        w = int(args.gpu_workers or 2 * n)
        runs.append({"name": f"mxconv cuda ({n} GPU{'s' if n > 1 else ''}, {w} workers)", "kind": "mxconv",
                     "argv": mx + ["--device", "cuda", "--workers", str(w)], "digest_group": "canonical",
                     "gpu": True})
    if recipe_exists(TRTLLM_RECIPE):
        dev, w = ("cuda", int(args.gpu_workers or 2 * torch.cuda.device_count())) if args.cuda else ("cpu", max(args.workers))
        runs.append({"name": f"mxconv FlashInfer layout ({dev}, {w} workers)", "kind": "mxconv",
                     "argv": mx + ["--device", dev, "--workers", str(w), "--recipe", TRTLLM_RECIPE],
                     "digest_group": "trtllm", "gpu": args.cuda})
    if llmc_python:
        w = max(args.workers)
        runs.append({"name": f"llm-compressor model_free_ptq MXFP8 (cpu, {w} workers)", "kind": "llmc",
                     "argv": [llmc_python, "-c", LLMC_DRIVER], "workers": w})
    return runs


TRTLLM_RECIPE = "deepseek_v3_mxfp8_trtllm"


def run_one(run: dict, src: Path, dst: Path, precision: str, config: Path | None = None) -> dict:
    if run["kind"] == "cp":
        return _timed(["cp", "-r", str(src), str(dst)])
    env = dict(os.environ)
    if _PYTHONPATH:
        env["PYTHONPATH"] = _PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    if run["kind"] == "two-step":
        work = dst.with_name(dst.name + "-two-step")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            first = _timed([sys.executable, "-c", TWO_STEP_DRIVER, str(src), str(work), str(config)], env=env)
            if first["returncode"]:
                return first
            second = _timed([sys.executable, "-m", "converter.cli", "convert", str(work / "hf"), str(dst), "-q",
                             "--workers", str(run["workers"])], env=env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dict(second, wall_s=round(first["wall_s"] + second["wall_s"], 3),
                    peak_rss_bytes=max(first["peak_rss_bytes"], second["peak_rss_bytes"]),
                    cpu_s=first["cpu_s"] + second["cpu_s"], stdout="", first_step_s=first["wall_s"])
    if run["kind"] == "llmc":
        return _timed(run["argv"] + [str(src), str(dst), precision, str(run["workers"])])
    extra = ["--config", str(config)] if config else []
    return _timed(run["argv"] + [str(src), str(dst), "-q"] + extra, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where the checkpoints and outputs go (default: a new "
                    "directory under /work if it exists, else the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (and reuse its sources next time)")
    ap.add_argument("--quick", action="store_true", help="small checkpoints, one repeat: a smoke run")
    ap.add_argument("--json", type=Path, help="write every run and the summary here")
    ap.add_argument("--repeats", type=int, help="timed runs of every row (default 3, --quick 1); the median counts")
    ap.add_argument("--precisions", default="bf16,fp8", help="source precisions: bf16,fp8")
    ap.add_argument("--workers", help="CPU worker counts to time (default 1,2)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: also time --device cuda when a GPU is present")
    ap.add_argument("--gpu-workers", help="workers for the CUDA rows (default 2 per GPU; --ceiling: a list)")
    ap.add_argument("--shards", type=int, help="source shards (at least 3; default 4, --ceiling 8)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 3: one dense, two MoE); each MoE layer "
                    "adds about 1.45 GB in FP8, 2.9 GB in BF16. Startup (Python, torch, CUDA) costs seconds, "
                    "so on fast machines a bigger checkpoint measures the steady state better")
    ap.add_argument("--llmc-python", help="python of an environment with llmcompressor (default: this one, "
                    "then /tmp/llmc-venv/bin/python)")
    ap.add_argument("--no-llmc", action="store_true", help="skip llm-compressor")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before each run and re-read the source (needs root; slow: the "
                         "source is read from disk every time). Default: the source stays cached, every "
                         "destination is deleted and synced before the next run")
    ap.add_argument("--llmc-repeats", type=int, default=1, help="timed llm-compressor runs (it is slow)")
    ap.add_argument("--ceiling", action="store_true", help="mxconv's own ceiling: source in the page cache, "
                    "destinations on tmpfs; rows for cp, a parallel copy (one cp per shard) and mxconv at several "
                    "worker counts on CPU and CUDA (defaults then: --workers 4,8,16, --gpu-workers 1,2, "
                    "--shards 8, 2 repeats)")
    ap.add_argument("--dest-dir", default="/dev/shm/mxconv-ceiling", help="--ceiling: where outputs go (tmpfs)")
    ap.add_argument("--max-shard-size", help="--ceiling: output shard size of the mxconv rows (default: mxconv's, "
                    "5GB); a real checkpoint has many output shards, a small bench source few")
    ap.add_argument("--compare", type=Path, help="--ceiling: also time the mxconv rows of this other checkout "
                    "(rows named 'before: ...')")
    ap.add_argument("--variants", help="--ceiling: extra mxconv rows with environment variables set or "
                    "convert flags added, as 'name:VAR=VALUE,--flag;name2:...' (the fewest and the most "
                    "CPU and GPU workers; a name ending in '@cuda' gets CUDA rows only; CORES=0-3 instead times a "
                    "parallel copy and mxconv's default workers on those CPUs alone, under taskset)")
    args = ap.parse_args()
    if args.ceiling:
        import bench_ceiling

        args.workers = [int(w) for w in (args.workers or "4,8,16").split(",")]
        # a GPU gets at most 2 workers (devices.STREAMS_PER_GPU): more would time the same run again
        args.gpu_worker_list = [int(w) for w in str(args.gpu_workers or "1,2").split(",")]
        args.repeats = args.repeats or (1 if args.quick else 2)
        args.shards = args.shards or 8
        return bench_ceiling.ceiling(args, _timed)
    args.workers = [int(w) for w in (args.workers or "1,2").split(",")]
    args.shards = args.shards or 4
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    config = dict(QUICK_CONFIG if args.quick else FULL_CONFIG)
    if args.layers:
        config["num_hidden_layers"] = args.layers

    workdir = args.workdir.resolve() if args.workdir else None  # the runs start in another directory
    if workdir is None:
        parent = Path("/work") if Path("/work").is_dir() and os.access("/work", os.W_OK) else None
        workdir = Path(tempfile.mkdtemp(prefix="mxconv-bench-", dir=parent))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    # every precision's source, and one destination at a time (a copy or a conversion, no bigger
    # than the largest source plus its MXFP8 scales)
    sizes = [source_size(config, "bf16" if p == "dcp" else p)
             for p in args.precisions.split(",")]
    need = sum(sizes) + 1.1 * max(sizes)
    if free < need:
        print(f"bench: {workdir} has {free / 1e9:.0f} GB free, needs about {need / 1e9:.0f} GB", file=sys.stderr)
        return 2
    llmc_python, llmc_why = (None, "--no-llmc") if args.no_llmc else find_llmc_python(args.llmc_python)
    drop = args.drop_caches and os.access("/proc/sys/vm/drop_caches", os.W_OK) and _drop_caches()
    report = {"machine": machine(), "config": {k: config[k] for k in ("hidden_size", "intermediate_size",
              "moe_intermediate_size", "n_routed_experts", "num_hidden_layers", "vocab_size")},
              "cache": "page cache dropped, then the source read again, before every timed run" if drop
              else "source in the page cache; previous destination deleted and synced before every run",
              "repeats": args.repeats, "llm_compressor": llmc_python or f"skipped: {llmc_why}",
              "load_before": os.getloadavg(), "precisions": {}}
    print(f"bench: workdir {workdir}; {report['cache']}; llm-compressor: {report['llm_compressor']}", flush=True)
    try:
        for precision in args.precisions.split(","):
            src = workdir / f"src-{precision}" / f"{'quick' if args.quick else 'full'}-{config['num_hidden_layers']}"
            hf_src = None
            if precision == "dcp":  # built from the BF16 source, which also gives --config
                hf_src = workdir / "src-bf16" / src.name
                if not (hf_src / INDEX_FILE).exists():
                    build_source(hf_src, config, "bf16", args.shards)
                if (src / ".metadata").exists():
                    facts = source_facts(src, "*.distcp")
                else:
                    t = time.perf_counter()
                    facts = build_dcp_source(src, hf_src)
                    print(f"bench: built DCP source, {facts['weight_bytes'] / 1e9:.2f} GB, in "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
            elif (src / INDEX_FILE).exists():
                facts = source_facts(src)
            else:
                t = time.perf_counter()
                facts = build_source(src, config, precision, args.shards)
                print(f"bench: built {precision} source, {facts['weight_bytes'] / 1e9:.2f} GB, in "
                      f"{time.perf_counter() - t:.0f} s", flush=True)
            dst = workdir / "dst"
            runs = plan_runs(args, precision, llmc_python)
            _prepare(src, dst, drop)
            _warm(src)
            run_one(runs[0], src, dst, precision, hf_src)  # warm-up copy, untimed
            rows: dict[str, list[dict]] = {r["name"]: [] for r in runs}
            digests: dict[str, set[str]] = {}
            for rep in range(args.repeats):
                for r in runs:  # alternate, so that every row sees the same machine conditions
                    if r["kind"] == "llmc" and rep >= args.llmc_repeats:
                        continue
                    _prepare(src, dst, drop)
                    res = run_one(r, src, dst, precision, hf_src)
                    if res["returncode"] == 0 and r.get("digest_group") and rep == 0:
                        digests.setdefault(r["digest_group"], set()).add(output_digest(dst))
                    rows[r["name"]].append(res)
                    status = f"{res['wall_s']:.2f} s" if res["returncode"] == 0 else \
                        f"FAILED: {(res['stderr'].strip().splitlines() or ['?'])[-1][:200]}"
                    print(f"bench: {precision} {r['name']}: {status}", flush=True)
            summary = summarize(rows, facts)
            identical = {g: len(d) == 1 for g, d in digests.items()}
            report["precisions"][precision] = {"source": facts, "runs": rows, "summary": summary,
                                               "outputs_identical_across_devices_and_workers": identical,
                                               "targets": targets(precision, facts, summary)}
            if dst.exists():
                shutil.rmtree(dst)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    m = report["machine"]
    if not m["torch_bytecode_cached"]:
        print("\nbench: NOTE torch has no cached bytecode here, so every run compiles its sources on import "
              "(seconds of start-up a normal pip install does not have); `python -m compileall -q "
              f"{Path(torch.__file__).parent.parent}` fixes that")
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM"
          + (f", {', '.join(m['gpus'])}" if m["gpus"] else "") + f"; torch {m['torch']}; "
          f"load average {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after")
    print(f"{report['cache']}; median of {args.repeats} run(s) ({args.llmc_repeats} for llm-compressor); "
          f"llm-compressor: {report['llm_compressor']}")
    for precision, r in report["precisions"].items():
        print()
        print(table(precision, r["source"], r["summary"]))
        for group, same in r["outputs_identical_across_devices_and_workers"].items():
            print(f"  {group} outputs byte-identical across rows: {'yes' if same else 'NO'}")
        for line in r["targets"]:
            print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
