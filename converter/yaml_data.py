"""Finding and parsing mxconv's YAML data (name mappings, recipes, model families, model card metadata) with
PyYAML's libyaml parser where the installed PyYAML has it, else its pure-Python one: the same
documents and error classes (libyaml words its messages and places its marks a little
differently), but the Python parser took 0.3 s of every run's start-up on a 2-core VM (a
conversion reads about a dozen of these files)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str):
    """yaml.safe_load, through libyaml when available."""
    return yaml.load(text, Loader=_LOADER)


def builtin_dir(kind: str):
    """The built-in data folder `kind` (mappings, configs, families): installed as the package
    converter.<kind>, or, in a source tree run without installing, the repository's folder."""
    try:
        return resources.files(f"converter.{kind}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / kind
