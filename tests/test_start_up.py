"""What a run does before its conversion begins: a conversion process waiting for its job has
already parsed the built-in data that opening a source reads, so the job starts on the source's
own headers alone; built-in namings are parsed once per process."""

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
def test_a_waiting_conversion_process_opens_its_source_without_parsing_yaml(cold, monkeypatch, tiny_sources,
                                                                             source):
    def no_yaml(text):
        raise AssertionError("parsed YAML after the process was ready")

    process_child._read_builtin_data()
    monkeypatch.setattr(yaml_data, "safe_load", no_yaml)
    view = open_view(str(tiny_sources[source]), "hf")
    assert "model.embed_tokens.weight" in view.tensors
    family.load_family.cache_clear()  # and without the data read ahead, it would have to
    with pytest.raises(AssertionError, match="parsed YAML"):
        open_view(str(tiny_sources[source]), "hf")


def test_a_conversion_process_reads_the_builtin_data_before_it_waits(monkeypatch):
    """`process_child.main` (a process started for a run) reads the data before its first job: a
    process dismissed without one has read it too."""
    read = []
    monkeypatch.setattr(process_child, "_read_builtin_data", lambda: read.append(True))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() sets its own
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # and SIGINT's handler: not this one's
    ours, theirs = Pipe()
    ours.send(None)  # dismissed: no job for it
    assert process_child.main(os.dup(theirs.fileno()), []) == 0
    assert read == [True]
