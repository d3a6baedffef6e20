"""What a run does before its conversion begins: a conversion process imports everything before
its job comes, and the job brings the source's canonical view as the parent planned from it, so
the process reads no header and parses no YAML before its first piece; built-in namings are
parsed once per process."""

from __future__ import annotations

import os
import signal
import warnings
from multiprocessing import Pipe

import pytest

from converter import yaml_data
from converter.mapping import names
from converter.models import family
from converter.run import process_child
from converter.run.pipeline import open_view


@pytest.fixture
def cold(monkeypatch):
    """This process as a fresh one finds it: no family or naming parsed yet (restored after)."""
    family.load_family.cache_clear()
    names._builtin_mapping.cache_clear()
    yield
    family.load_family.cache_clear()
    names._builtin_mapping.cache_clear()


def test_builtin_namings_are_parsed_once_per_process_and_files_each_time(cold, monkeypatch, tmp_path):
    reads = []
    real = names.read_rule_file
    monkeypatch.setattr(names, "read_rule_file", lambda path: reads.append(str(path)) or real(path))
    first = names.load_mapping("hf")
    assert names.load_mapping("hf") is first and len(reads) == 1
    mine = tmp_path / "mine.yaml"  # a user's file may change between runs: read every time
    mine.write_text((yaml_data.builtin_dir("mappings") / "hf.yaml").read_text())
    names.load_mapping(str(mine))
    names.load_mapping(str(mine))
    assert reads[1:] == [str(mine), str(mine)]


@pytest.mark.parametrize("source", ["fp8", "bf16"])
def test_a_conversion_process_converts_from_the_view_it_is_sent(cold, monkeypatch, tiny_sources, tmp_path, source):
    """The job's view, pickled as `processes.write` sends it, is what the process converts from:
    no header of the source is read and no YAML parsed there (the job's opener, which would do
    both, fails if called), and the shards are those one process writes."""
    import functools
    import pickle

    from converter.run.pipeline import convert, plan_conversion
    from converter.sources import checkpoint

    src = tiny_sources[source]
    convert(src, tmp_path / "one", max_shard_size="2MB", quiet=True, processes=1)
    _, view, _, plan = plan_conversion(src, max_shard_size="2MB")

    def refuse(*args, **kwargs):
        raise AssertionError("read the source's headers or parsed YAML in the process")

    monkeypatch.setenv("MXCONV_CORE_SHARE", "2")  # _run sets it for its process: restored after
    monkeypatch.setattr(yaml_data, "safe_load", refuse)
    monkeypatch.setattr(checkpoint.SourceCheckpoint, "open", classmethod(refuse))
    (tmp_path / "many" / ".mxconv").mkdir(parents=True)
    job = {"view": pickle.dumps(view), "opener": functools.partial(open_view, str(src), "hf"), "shards": plan.shards,
           "dst": str(tmp_path / "many"), "recipe": plan.recipe, "devices": ["cpu", "cpu"], "cores": 2}
    ours, theirs = Pipe()
    process_child._run(job, process_child._Sender(theirs))
    for shard in plan.shards:
        assert (tmp_path / "many" / shard.name).read_bytes() == (tmp_path / "one" / shard.name).read_bytes()
    with pytest.raises(AssertionError, match="read the source"):  # the opener would have
        process_child._run({k: v for k, v in job.items() if k != "view"}, process_child._Sender(theirs))


def test_a_conversion_process_imports_ahead_before_it_waits(monkeypatch):
    """`process_child.main` (a process started for a run) imports what a job unpickles into before
    its first job: a process dismissed without one has imported it too."""
    read = []
    monkeypatch.setattr(process_child, "_import_ahead", lambda: read.append(True))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() sets its own
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # and SIGINT's handler: not this one's
    ours, theirs = Pipe()
    ours.send(None)  # dismissed: no job for it
    assert process_child.main(os.dup(theirs.fileno()), []) == 0
    assert read == [True]
