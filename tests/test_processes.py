"""One machine's conversion in several processes (run/processes.py): the same bytes as one
process, on every source kind; how many processes a machine gets; a process that dies, and a
parent that dies, leave what an interrupted run leaves, and the same command resumes.
(Errors, warnings and Ctrl-C with several processes: test_bad_input.py, test_interrupt.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_process import MxconvProcess, run_mxconv
from test_interrupt import SHARD, reference, src  # noqa: F401  (the FP8 source, its conversion)
from test_reliability import assert_same_tree, finished_shards, leftovers

from converter.files import MANIFEST_FILE, PROVENANCE_FILE, STATE_DIR
from converter.run import forked, processes
from converter.run.pipeline import convert
from converter.run.summary import describe_result


def shard(name: str, *sizes: int) -> SimpleNamespace:
    """A planned shard as `processes` sees it: a name and jobs of these source bytes."""
    return SimpleNamespace(name=name, jobs=[SimpleNamespace(input_bytes=b) for b in sizes])


def _shards(names: str) -> list[SimpleNamespace]:
    return [shard(n, 100) for n in names]


def test_process_count_follows_the_workers_and_the_environment(monkeypatch):
    monkeypatch.delenv("MXCONV_PROCESSES", raising=False)
    monkeypatch.delenv("MXCONV_CPU_HELPERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [processes.process_count("cpu", w) for w in (None, 2, 4, 7, 8, 16, 64)] == [4, 1, 1, 1, 2, 4, 8]
    assert processes.process_count("cuda", None) == 4  # the CPU helpers take the cores
    monkeypatch.setenv("MXCONV_CPU_HELPERS", "0")
    assert processes.process_count("cuda", None) == 1  # GPUs alone: the host only copies
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert processes.process_count("cpu", None) == 1 and processes.process_count("cpu", 16) == 4
    monkeypatch.setenv("MXCONV_PROCESSES", "3")
    assert processes.process_count("cpu", 2) == 3


@pytest.mark.parametrize("kind", ["fp8", "bf16", "fp8_ue8m0", "megatron", "fsdp"])
def test_several_processes_write_the_bytes_one_does(tiny_sources, dcp_sources, tmp_path, kind):
    """Every file byte for byte (mxconv.json but its time; the manifest but the source files'
    inodes): shards, index, config, and the source sha256s, which the parent hashed as the
    processes reported reading the files. The processes convert from the view the parent
    planned from, sent pickled (a DCP view with the chunks it has located too)."""
    if kind in ("megatron", "fsdp"):
        src, options = dcp_sources[kind], {"config": dcp_sources["hf"]}
    else:
        src, options = tiny_sources[kind], {}
    one = convert(src, tmp_path / "one", max_shard_size=SHARD, quiet=True, processes=1, workers=3, **options)
    many = convert(src, tmp_path / "many", max_shard_size=SHARD, quiet=True, processes=3, workers=3, **options)
    assert len(one.plan.shards) >= 6 and (one.processes, many.processes) == (1, 3)
    assert "of input), in 3 processes\n" in describe_result(many) and "of input)\n" in describe_result(one)
    assert_same_tree(tmp_path / "many", tmp_path / "one")
    assert many.input_converted == one.input_converted


def test_each_process_gets_its_share_of_shards_and_devices(monkeypatch):
    """Shards of one size: shard i goes to process i mod P; P is at most the shards left, and
    Ctrl-C is passed on to each."""
    sent = []

    class Stop(Exception):
        pass

    def wait(conns, raised=[KeyboardInterrupt(), Stop()]):  # Ctrl-C, then out of the loop
        raise raised.pop(0) if raised else Stop()

    monkeypatch.setattr(processes._Child, "tell", lambda self, message: sent.append(message))
    monkeypatch.setattr(processes, "wait", wait)
    monkeypatch.setattr(processes, "_take", lambda n: [_Fake() for _ in range(n)])
    with pytest.raises(Stop):
        processes.run(_shards("abcde"), 3, {"dst": "d"}, ["cuda:0", "cpu", "cpu", "cpu"], print, print)
    jobs = [m for m in sent if isinstance(m, dict)]
    assert [[s.name for s in j["shards"]] for j in jobs] == [["a", "d"], ["b", "e"], ["c"]]
    assert [j["devices"] for j in jobs] == [["cuda:0", "cpu"], ["cpu"], ["cpu"]]
    assert sent.count("stop") == 3
    # each GPU's workers in one process (one CUDA context per GPU); the CPU workers evenly, as if
    # there were no GPU workers, the extra ones to processes without a GPU first
    assert processes.deal(["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cpu", "cpu", "cpu"], 3) == [
        ["cuda:0", "cuda:0", "cpu"], ["cuda:1", "cuda:1", "cpu"], ["cpu"]]
    assert processes.deal(["cuda:0"] * 2 + ["cpu"] * 6, 4) == [["cuda:0", "cuda:0", "cpu"], ["cpu"] * 2, ["cpu"] * 2,
                                                               ["cpu"]]
    # a GPU worker more never takes a CPU worker from its process (16 cores: 14 CPU helpers)
    one, two = (processes.deal(["cuda:0"] * g + ["cpu"] * 14, 4) for g in (1, 2))
    assert [p.count("cpu") for p in one] == [p.count("cpu") for p in two] == [3, 4, 4, 3]
    assert [p.count("cuda:0") for p in two] == [2, 0, 0, 0]
    assert processes.deal(["cpu"] * 16, 4) == [["cpu"] * 4] * 4
    sent.clear()  # shards of unequal size: dealt by bytes (`share`), not in turn
    with pytest.raises(Stop):
        processes.run([shard("a", 500), *_shards("bcde")], 2, {"dst": "d"}, ["cpu"] * 8, print, print)
    assert [[s.name for s in m["shards"]] for m in sent if isinstance(m, dict)] == [["a"], ["b", "c", "d", "e"]]
    sent.clear()
    with pytest.raises(Stop):
        processes.run(_shards("ab"), 8, {"dst": "d"}, ["cpu"] * 16, print, print)
    assert len([m for m in sent if isinstance(m, dict)]) == 2
    sent.clear()  # one GPU's workers alone: one process, not one with nothing to run
    with pytest.raises(Stop):
        processes.run(_shards("abcd"), 4, {"dst": "d"}, ["cuda:0", "cuda:0"], print, print)
    assert [m["devices"] for m in sent if isinstance(m, dict)] == [["cuda:0", "cuda:0"]]


def test_shards_are_shared_by_source_bytes_in_plan_order():
    """Each shard, in plan order, goes to the process with the fewest source bytes so far: equal
    shards go in turn, a heavy first shard is made up for with the light last one."""
    equal = [shard(f"s{i}", 10, 9) for i in range(7)]
    assert processes.share(equal, 3) == [equal[0::3], equal[1::3], equal[2::3]]
    # a heavy first shard (an embedding) and a light last one
    plan = [shard("s0", 120, 80), *(shard(f"s{i}", 190) for i in range(1, 7)), shard("s7", 150)]
    parts = processes.share(plan, 4)
    assert [[s.name for s in p] for p in parts] == [["s0", "s7"], ["s1", "s4"], ["s2", "s5"], ["s3", "s6"]]
    loads = [sum(j.input_bytes for s in p for j in s.jobs) for p in parts]
    in_turn = [sum(j.input_bytes for s in plan[i::4] for j in s.jobs) for i in range(4)]
    assert max(loads) == 380 < max(in_turn) == 390
    heavy = [shard("a", 500), shard("b", 100), shard("c", 100), shard("d", 100), shard("e", 100)]
    assert [[s.name for s in p] for p in processes.share(heavy, 2)] == [["a"], ["b", "c", "d", "e"]]
    empty = [shard(n) for n in "abcde"]  # no bytes at all: still in turn, no process left without one
    assert [[s.name for s in p] for p in processes.share(empty, 3)] == [["a", "d"], ["b", "e"], ["c"]]


def _gone(child, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while child.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return child.proc.poll() is not None


def test_kept_processes_take_the_next_run_then_leave(tiny_sources, tmp_path):
    """`keep` (a Ray node's tasks): a run that succeeded leaves its processes waiting; the next
    run takes them (no start-up) and writes the same bytes; one kept too long is not taken, and
    leaves by itself; after a failure none is kept."""
    src = tiny_sources["fp8"]
    plan, job, _, cpus = _plan_and_job(src)

    def run(name: str, keep: float) -> list:
        (tmp_path / name).mkdir()
        processes.run(plan.shards, 2, dict(job, dst=str(tmp_path / name)), cpus, lambda n: None, lambda p: None,
                      keep=keep)
        return [c for c, _ in processes._kept]

    try:
        first = run("first", keep=60)
        assert len(first) == 2 and all(c.proc.poll() is None for c in first)
        again = run("again", keep=0)
        assert processes.reused == 2 and again == [] and all(_gone(c) for c in first)
        for shard in plan.shards:
            assert (tmp_path / "first" / shard.name).read_bytes() == (tmp_path / "again" / shard.name).read_bytes()
        one = convert(src, tmp_path / "one", max_shard_size=SHARD, quiet=True, processes=1)
        assert all((tmp_path / "one" / s.name).read_bytes() == (tmp_path / "first" / s.name).read_bytes()
                   for s in one.plan.shards)
        brief = run("brief", keep=5)  # within _KEEP_MARGIN of its end already: never taken
        assert len(brief) == 2 and all(c.proc.poll() is None for c in brief)
        after = run("after", keep=60)  # while they still wait
        assert processes.reused == 0 and len(after) == 2 and all(_gone(c) for c in brief)
        (tmp_path / "blocked").write_text("a file where the output folder should be")
        # (a destination the pipeline's preflight would have refused: the process crashes on it)
        with pytest.raises(RuntimeError, match="NotADirectoryError"):
            processes.run(plan.shards, 2, dict(job, dst=str(tmp_path / "blocked")), cpus, lambda n: None,
                          lambda p: None, keep=60)
        assert processes.reused == 2 and processes._kept == []  # taken, failed, not kept
        assert all(_gone(c) for c in after)
    finally:
        processes.dismiss_warm()


def _plan_and_job(src):
    import functools

    import torch

    from converter.run.pipeline import open_view, plan_conversion

    _, _, mapping, plan = plan_conversion(src, max_shard_size=SHARD)
    job = {"opener": functools.partial(open_view, str(src), mapping), "recipe": plan.recipe}
    return plan, job, mapping, [torch.device("cpu")] * 4


def test_kept_processes_are_reused_only_in_the_environment_they_started_in(tiny_sources, tmp_path, monkeypatch):
    """Ray sets CUDA_VISIBLE_DEVICES per task: a process started under other GPUs (or other mxconv
    settings) is not reused; one that died while kept is replaced, and its job still runs."""
    plan, job, _, cpus = _plan_and_job(tiny_sources["fp8"])
    silent = (lambda n: None, lambda p: None)
    try:
        for name in ("a", "b", "c"):
            (tmp_path / name).mkdir()
        processes.run(plan.shards, 2, dict(job, dst=str(tmp_path / "a")), cpus, *silent, keep=60)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
        processes.run(plan.shards, 2, dict(job, dst=str(tmp_path / "b")), cpus, *silent, keep=60)
        assert processes.reused == 0  # the first two were let go, these two kept
        victim = processes._kept[0][0]
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        victim.proc.poll = lambda: None  # as if it died between being taken and hearing its job
        processes.run(plan.shards, 2, dict(job, dst=str(tmp_path / "c")), cpus, *silent, keep=0)
        assert processes.reused == 1 and processes._kept == []  # the one that died is not counted
        for shard in plan.shards:
            assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "c" / shard.name).read_bytes()
    finally:
        processes.dismiss_warm()


def test_after_a_failure_the_processes_that_finished_are_not_kept(tiny_sources, tmp_path, monkeypatch):
    """One shard each: one process finishes its job (and would wait for the next, `keep`), the
    other fails a second later; the one that finished is let go, not kept."""
    import functools

    from helpers import open_view_failing_once

    from converter.errors import SourceError

    plan, job, mapping, cpus = _plan_and_job(tiny_sources["fp8"])
    flag = tmp_path / "fail"
    flag.write_text("")
    job["opener"] = functools.partial(open_view_failing_once, str(flag), str(tiny_sources["fp8"]), mapping,
                                      str(tmp_path / "out"), settle=1.0)
    (tmp_path / "out").mkdir()
    dismissed, real = [], processes._Child.dismiss
    monkeypatch.setattr(processes._Child, "dismiss", lambda self: dismissed.append(self) or real(self))
    with pytest.raises(SourceError, match="planted failure"):
        processes.run(plan.shards[:2], 2, dict(job, dst=str(tmp_path / "out")), cpus, lambda n: None,
                      lambda p: None, keep=60)
    assert len(dismissed) == 1  # the one that had finished its job and waited for another
    assert processes._kept == [] and not [c for c in _children(os.getpid()) if _is_converter(c)]
    assert any((tmp_path / "out" / s.name).exists() for s in plan.shards[:2])  # the other one did finish


def test_a_process_that_cannot_be_started_is_a_clean_error(monkeypatch):
    import errno

    from converter.errors import MxconvError

    def no_more(*args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(forked.subprocess, "Popen", no_more)
    with pytest.raises(MxconvError, match="cannot start a conversion process: Resource temporarily unavailable"):
        processes._Child()


def test_a_process_killed_by_sigbus_is_said_to_have_read_a_file_cut_short():
    class Child:
        class proc:
            pid = 7

            @staticmethod
            def wait():
                return -signal.SIGBUS

    message = str(processes._died(Child()))
    assert "killed by SIGBUS" in message and "source file cut short" in message


def test_a_stop_that_comes_before_the_job_starts_stops_it():
    """A "stop" read by a process's watcher after the job but before the job started (Ctrl-C
    right after the jobs went out) stops that job as it starts, once."""
    from converter.run.process_child import _Inbox

    inbox = _Inbox()
    inbox.interrupt()
    with pytest.raises(KeyboardInterrupt):
        inbox.set_running(True)
    inbox.set_running(False)
    inbox.set_running(True)  # the next job runs
    inbox.set_running(False)


class _Fake:
    """A conversion process that never starts (for the dealing above)."""

    class proc:
        pid = 0

        @staticmethod
        def poll():
            return 0

    reused = False

    def __init__(self):
        self.conn = object()

    def tell(self, message):
        processes._Child.tell(self, message)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _started(dst: Path, proc: MxconvProcess, shards: int = 1) -> bool:
    deadline = time.monotonic() + 60
    while proc.alive() and time.monotonic() < deadline:
        if (dst / STATE_DIR / MANIFEST_FILE).exists() and finished_shards(dst) >= shards:
            return True
        time.sleep(0.0005)
    return False


# One CPU (a 1-core runner, taskset): one worker by default, which converts in the command's own
# process (processes.write), so there is no conversion process to kill
needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: the run stays in one process")


@needs_two_cpus
def test_a_conversion_process_that_dies_is_named_and_the_rerun_resumes(src, reference, tmp_path):
    """Killed outright (the kernel's OOM killer does that), it cannot clean up: the run says which
    process died, exits non-zero, stops the others; the rerun removes what it left and resumes."""
    argv = ["convert", src, None, "--max-shard-size", SHARD, "--processes", "2", "-q"]
    for attempt in range(10):  # the tiny conversion may finish before the kill lands: try again
        dst = argv[2] = tmp_path / f"dst-{attempt}"
        proc, victims = MxconvProcess(argv, tmp_path / "logs"), []
        if _started(dst, proc) and (victims := [c for c in _children(proc.proc.pid) if _is_converter(c)]):
            os.kill(victims[0], signal.SIGKILL)
        result = proc.wait()
        if not (dst / PROVENANCE_FILE).exists():
            break
    else:
        pytest.fail("the conversion finished before the kill every time")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mxconv: error: conversion process {victims[0]} was killed by SIGKILL")
    assert lines[0].endswith("rerun the same command to resume")
    assert not (dst / PROVENANCE_FILE).exists()
    again = run_mxconv(argv, tmp_path / "logs")
    assert again.returncode == 0, again.stderr
    assert not leftovers(dst)
    assert_same_tree(dst, reference)


def _is_converter(pid: int) -> bool:
    try:
        return b"converter.run.process_child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@needs_two_cpus
def test_a_killed_parent_stops_its_processes_and_the_rerun_resumes(src, reference, tmp_path):
    """SIGKILL to mxconv itself: its conversion processes see their socket close, remove their
    unfinished shards and exit instead of writing on unwatched."""
    argv = ["convert", src, None, "--max-shard-size", SHARD, "--processes", "2", "-q"]
    for attempt in range(10):
        dst = argv[2] = tmp_path / f"dst-{attempt}"
        proc = MxconvProcess(argv, tmp_path / "logs")
        children = []
        if _started(dst, proc):
            children = [c for c in _children(proc.proc.pid) if _is_converter(c)]
            proc.kill()
        proc.wait()
        if children and not (dst / PROVENANCE_FILE).exists():
            break
    else:
        pytest.fail("the conversion finished before the kill every time")
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(_alive(c) for c in children)
    assert not leftovers(dst)  # they removed their temporary shards
    assert finished_shards(dst) < finished_shards(reference)
    again = run_mxconv(argv, tmp_path / "logs")
    assert again.returncode == 0, again.stderr
    assert_same_tree(dst, reference)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.cuda
def test_a_kept_process_gives_its_cached_gpu_memory_back():
    """Between jobs a kept process holds the CUDA context and nothing more of the GPU: the blocks
    torch's allocator cached for the last job go back (Ray counts that memory as free)."""
    import torch

    from converter.run.process_child import _let_go_of_gpu_memory

    before = torch.cuda.memory_reserved()  # blocks earlier tests in this process still hold stay
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    del block
    assert torch.cuda.memory_reserved() >= before + (64 << 20)  # cached by the allocator, not given back
    _let_go_of_gpu_memory()
    assert torch.cuda.memory_reserved() <= before


_WARM_RUN = """
import json, os, sys
from pathlib import Path
os.environ["OPENBLAS_NUM_THREADS"] = sys.argv[1]  # more than 1: numpy's BLAS starts a thread on import
from converter.run import processes
from converter.run.pipeline import convert

processes.warm_up(3, "cpu", 3)
pids = [c.proc.pid for c in processes._warm]  # once the zygote has started them and exited
cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
parents = [int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in pids]
result = convert(sys.argv[2], sys.argv[3], max_shard_size=sys.argv[4], quiet=True, processes=3, workers=3)
print(json.dumps({"forked": [b"import zygote" in c for c in cmdlines], "ours": [p == os.getpid() for p in parents],
                  "processes": result.processes, "taken": not processes._warm,
                  "left": [p for p in pids if Path(f"/proc/{p}").exists()]}))
"""


@pytest.mark.parametrize("blas_threads, forked", [("1", True), ("2", False)])
def test_warm_processes_come_from_one_zygote_and_are_ours_to_wait_for(tiny_sources, tmp_path, blas_threads, forked):
    """`warm_up` (the CLI's) starts one process that imports, forks the run's processes and exits:
    they are then this process's children (its subreaper), take the run's jobs, write the bytes
    one process writes, and are waited for (none left, not even as zombies). A zygote with a
    thread of a library's own (numpy's BLAS, unless OPENBLAS_NUM_THREADS=1 as the CLI sets it)
    starts them as new interpreters instead of forking."""
    import json
    import subprocess
    import sys

    if not forked:  # OpenBLAS starts no thread on one CPU, nor does another BLAS: nothing to see then
        probe = ("import os; os.environ['OPENBLAS_NUM_THREADS'] = '2'; import numpy; "
                 "print(len(os.listdir('/proc/self/task')))")
        if subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "1":
            pytest.skip("numpy's BLAS starts no thread here")
    convert(tiny_sources["fp8"], tmp_path / "one", max_shard_size=SHARD, quiet=True, processes=1, workers=3)
    run = subprocess.run([sys.executable, "-c", _WARM_RUN, blas_threads, str(tiny_sources["fp8"]),
                          str(tmp_path / "many"), SHARD], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"forked": [forked] * 3, "ours": [True] * 3, "processes": 3, "taken": True, "left": []}
    assert_same_tree(tmp_path / "many", tmp_path / "one")


def test_a_command_that_stops_early_leaves_its_zygote_quiet(tmp_path):
    """An error before the run (here: no source) ends the command while its processes' zygote is
    still importing. The zygote and the processes it forks find the command gone and exit
    without a word: the one error line is all that the command's stderr ever gets (read to its
    end, which comes once the last of them has exited)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "converter.cli", "convert", str(tmp_path / "missing"),
                          str(tmp_path / "out"), "--processes", "3", "-q"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("mxconv: error: "), run.stderr
