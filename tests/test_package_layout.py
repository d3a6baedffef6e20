"""The package's shape: no import cycle anywhere in `converter/` (imports inside functions
included), every module says what it is for, and none is over about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "converter"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the converter modules it imports (at any depth of the code)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod where one exists
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph(_modules())) is None, " -> ".join(find_cycle(import_graph(_modules())))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "converter"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from converter.sub.a import f\n")
    mods = {_module_name_in(pkg, p): p for p in pkg.rglob("*.py")}
    assert find_cycle(import_graph(mods)) is not None


def _module_name_in(pkg: Path, path: Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_numerics_reference_depends_on_no_other_numerics_module():
    graph = import_graph(_modules())
    assert not {m for m in graph["converter.numerics.reference"] if m.startswith("converter.numerics")}


def test_every_module_has_a_docstring_and_is_not_too_long():
    for name, path in _modules().items():
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{name} has no module docstring"
        assert len(text.splitlines()) <= MAX_LINES, f"{name} has {len(text.splitlines())} lines"


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by name: a new stage folder missing there would be left out of
    the wheel (and out of a non-editable install) while the tests, run from the checkout, pass."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert present <= listed, f"not in pyproject.toml's packages: {sorted(present - listed)}"


def test_built_in_data_is_found_installed_or_from_the_source_tree(monkeypatch):
    """mappings/, configs/ and families/ are packages once installed; run from a source tree
    without installing, the same files come from the repository's folders."""
    from converter import yaml_data

    installed = {k: sorted(p.name for p in yaml_data.builtin_dir(k).iterdir() if p.name.endswith(".yaml"))
                 for k in ("mappings", "configs", "families")}

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(yaml_data.resources, "files", not_installed)
    for kind, names in installed.items():
        assert names and sorted(p.name for p in yaml_data.builtin_dir(kind).iterdir() if p.name.endswith(".yaml")) == names


def test_the_kernel_sources_are_installed():
    """native.py compiles these at run time, from the installed package: a file that no
    package-data pattern names would be missing from the wheel, and every install would fall back
    to the slower torch kernels."""
    import fnmatch
    import tomllib

    from converter.numerics import native

    patterns = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for source in (*native.SOURCES, native.HEADER):
        assert source.is_file() and any(fnmatch.fnmatch(source.name, p) for p in patterns["converter.numerics"]), source
