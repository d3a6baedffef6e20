"""Ctrl-C (SIGINT) says what happened in one line, exits 130, leaves no temporary file and no
marker that looks complete, and the same command resumes (GitHub issue 19)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from cli_process import MxconvProcess, reference_conversion, run_mxconv
from test_reliability import assert_same_tree, finished_shards, leftovers

import converter.run.execute
import converter.run.pipeline
from converter.files import (
    MANIFEST_FILE,
    PROVENANCE_FILE,
    STATE_DIR,
    VERIFY_REPORT_FILE,
)
from converter.run.output import incomplete_reason

SHARD = "100KB"  # the tiny FP8 checkpoint becomes about 40 output shards


@pytest.fixture(scope="module")
def src(tiny_sources):
    return tiny_sources["fp8"]


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    return reference_conversion(src, tmp_path_factory.mktemp("reference"), SHARD)


def _sigint_state(pid: int) -> str:
    """Whether SIGINT is blocked (main thread), ignored or caught in process `pid`, from /proc."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except OSError:
        return "exited"
    bit = 1 << (signal.SIGINT - 1)
    return " ".join(f"{k}={'yes' if int(fields[k], 16) & bit else 'no'}" for k in ("SigBlk", "SigIgn", "SigCgt")
                    if k in fields)


@pytest.mark.parametrize("processes", ["1", "3"])
def test_sigint_during_convert_says_so_exits_130_and_the_rerun_resumes(src, reference, tmp_path, processes):
    """With several conversion processes, Ctrl-C reaches the parent only (they run in their own
    session, as they would from a terminal); it passes it on and waits for them to clean up."""
    planned = finished_shards(reference)
    argv = ["convert", src, None, "--max-shard-size", SHARD, "--processes", processes]  # progress bars on
    tries = []  # what each attempt saw when it sent SIGINT: said if none was interrupted
    for attempt in range(10):  # the tiny conversion may finish before the signal lands: try again
        dst, logs = tmp_path / f"dst-{attempt}", tmp_path / "logs"
        argv[2] = dst
        proc = MxconvProcess(argv, logs)
        deadline = time.monotonic() + 60
        while proc.alive() and time.monotonic() < deadline:
            if (dst / STATE_DIR / MANIFEST_FILE).exists() and finished_shards(dst) >= 1 + attempt % 3:
                break
            time.sleep(0.0005)
        tries.append(f"{finished_shards(dst)} of {planned} shards, {_sigint_state(proc.proc.pid)}")
        sent = time.monotonic()
        os.kill(proc.proc.pid, signal.SIGINT)
        result = proc.wait()
        stopped = time.monotonic() - sent
        if not (dst / PROVENANCE_FILE).exists():
            break
        assert result.returncode in (0, 130)
    else:
        pytest.fail("the conversion finished before SIGINT every time: was the signal ignored? At each SIGINT: "
                    + "; ".join(tries))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    done = finished_shards(dst)
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last == f"mxconv: interrupted: {done} of {planned} shard(s) done; rerun the same command to resume"
    assert result.stderr.count("mxconv: interrupted") == 1
    assert 0 < done < planned
    assert stopped < 10  # the workers stopped at their current piece
    assert not leftovers(dst)  # partial shards were removed, no temporary file looks complete
    assert incomplete_reason(dst) is not None and not (dst / PROVENANCE_FILE).exists()
    again = run_mxconv(argv + ["-q"], logs)
    assert again.returncode == 0, again.stderr
    assert f"resumed ({done} shard(s) already done, " in again.stdout  # and the rate is over what it converted:
    now = re.search(r"already done, ([0-9.]+) (B|KB|MB) of input converted now\)", again.stdout)
    whole = converter.run.pipeline.plan_conversion(src)[3].input_bytes
    assert now and float(now.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6}[now.group(2)] < whole
    assert_same_tree(dst, reference)


def test_interrupted_verify_writes_no_report(src, reference, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    import converter.verify.runner
    from converter.cli import app

    dst = tmp_path / "dst"
    shutil.copytree(reference, dst)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.verify.runner, "check_jobs", interrupted)
    result = CliRunner().invoke(app, ["verify", str(src), str(dst), "-q"])
    assert result.exit_code == 130
    assert result.stderr == "mxconv: interrupted: verify stopped, no report written; rerun the same command to verify\n"
    assert "Traceback" not in result.output
    assert not (dst / VERIFY_REPORT_FILE).exists() and not leftovers(dst)
    # the same inside `convert --verify`: the conversion is finished, a rerun verifies again
    result = CliRunner().invoke(app, ["convert", str(src), str(dst), "-q", "--max-shard-size", SHARD, "--verify"])
    assert result.exit_code == 130 and "already complete" in result.stdout
    assert result.stderr.endswith("mxconv: interrupted: verify stopped, no report written; rerun the same "
                                  "command to verify\n")
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["verify", str(src), str(dst), "-q"])
    assert result.exit_code == 0 and (dst / VERIFY_REPORT_FILE).exists()


def test_ctrl_c_in_an_atomic_write_leaves_no_temporary_file(tmp_path):
    from converter.run.writer import write_atomic

    def fill(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "config.json", fill)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_library_call_is_still_a_keyboard_interrupt(src, tmp_path, monkeypatch):
    """`convert()` raises Interrupted, a KeyboardInterrupt carrying the CLI's message."""
    from converter.errors import Interrupted

    real = converter.run.execute.execute

    def two_shards(todo, *args, **kwargs):
        real(todo[:2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.run.execute, "execute", two_shards)
    with pytest.raises(Interrupted) as err:
        converter.run.pipeline.convert(src, tmp_path / "dst", max_shard_size=SHARD, quiet=True,
                                       processes=1)  # in this process, where `execute` is replaced
    assert isinstance(err.value, KeyboardInterrupt)
    assert err.value.message.startswith("2 of ") and Path(tmp_path / "dst").is_dir()


@pytest.mark.parametrize("when", ["while the threads start", "while the last pieces are written"])
def test_ctrl_c_at_the_edges_of_the_pipeline_leaves_no_temporary_shard(src, tmp_path, monkeypatch, when):
    """Ctrl-C lands in the main thread wherever it is: while it starts the pipeline's threads (a
    reader has already created its shard's temporary file) or while it waits for the writers at
    the end. Either way the run stops, says it was interrupted, and leaves no .partial file."""
    import threading
    import types

    import converter.run.execute as execute
    from converter.errors import Interrupted

    dst = tmp_path / "dst"
    partial = lambda: list((dst / STATE_DIR).glob("*.partial")) if (dst / STATE_DIR).is_dir() else []  # noqa: E731

    class Thread(threading.Thread):
        starts = 0

        def start(self):
            super().start()
            Thread.starts += 1
            if when == "while the threads start" and Thread.starts == 3:
                deadline = time.monotonic() + 30
                while not partial() and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert partial(), "no reader opened a shard"
                raise KeyboardInterrupt

        def join(self, timeout=None):
            if when == "while the last pieces are written" and self.name == "mxconv-write-0" and not Thread.raised:
                Thread.raised = True
                assert partial()
                raise KeyboardInterrupt
            super().join(timeout)

    Thread.raised = False
    monkeypatch.setattr(execute, "threading", types.SimpleNamespace(**{**vars(threading), "Thread": Thread}))
    if when == "while the last pieces are written":  # the writers are still busy when the readers are done
        write_rows = execute.ShardWriter.write_rows

        def slowly(self, *args):
            time.sleep(0.02)
            return write_rows(self, *args)

        monkeypatch.setattr(execute.ShardWriter, "write_rows", slowly)
    with pytest.raises(Interrupted):
        converter.run.pipeline.convert(src, dst, max_shard_size="50MB", quiet=True, workers=2, hash_sources=False)
    assert partial() == [] and not leftovers(dst) and not (dst / PROVENANCE_FILE).exists()
    pipeline = ("mxconv-read", "mxconv-work", "mxconv-write", "mxconv-finish")
    assert not [t.name for t in threading.enumerate() if t.name.startswith(pipeline)]  # every one stopped
