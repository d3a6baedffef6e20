"""Name mapping stage: turn a source checkpoint's tensor names into the canonical Hugging Face
names (SPEC 1) as a plan of renames, splits and fuses. The rules are data
(`mappings/*.yaml`, format described in `mappings/hf.yaml`); everything here works from names
and shapes only, except `materialize`, which cuts or joins tensors the plan names."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from typing import Mapping as MappingOf

import torch

from converter import yaml_data
from converter.errors import MappingError
from converter.mapping.rules import CANONICAL_SCALE, CONTEXT_VARS, DIGITS, Rule, read_rule_file, term_value  # noqa: F401 (public here too)

BUILTIN = ("hf", "megatron", "deepseek", "torchtitan")
_SHOWN = 5  # names quoted per problem in an error message
_PROBLEMS = {  # kind of problem -> how to say it of one name, of several
    "unmatched": ("tensor matches no rule", "tensors match no rule"),
    "ambiguous": ("tensor matches several rules", "tensors match several rules"),
    "shape": ("tensor with an unusable shape", "tensors with unusable shapes"),
    "twice": ("target produced twice", "targets produced twice"),
    "partner": ("fuse input missing", "fuse inputs missing"),
}


@dataclass(frozen=True)
class Derivation:
    """How one tensor is made from others: `rename` (one source), `split` (part `index` of
    `parts` equal parts of one source along `dim`), `fuse` (sources concatenated along `dim`) or
    `slice` (rows [rows[0], rows[1]) of one source seen as 2-D [all but the last dim, last dim]:
    one expert of stacked experts, a vocabulary without its padding). `shared`: a copy of
    another target that the source stores once (never inverted)."""

    target: str
    sources: tuple[str, ...]
    op: str
    dim: int = 0
    index: int = 0
    parts: int = 1
    rows: tuple[int, int] | None = None
    shared: bool = False

    def __post_init__(self):
        want = {"rename": len(self.sources) == 1, "split": len(self.sources) == 1,
                "fuse": len(self.sources) >= 2, "slice": len(self.sources) == 1 and self.rows is not None}
        if not want.get(self.op, False):
            raise MappingError(f"bad derivation {self.op} of {len(self.sources)} source(s)", tensor=self.target)


class _Matcher:
    """Finds every (rule, side index) whose template matches a name. Templates are bucketed by
    skeleton (digit runs replaced by '#') so a name is tried against one or two regexes, not all."""

    def __init__(self, entries):
        self.by_skeleton, self.wild = {}, []
        for rule, k, template in entries:
            bucket = self.wild if template.skeleton is None else self.by_skeleton.setdefault(template.skeleton, [])
            bucket.append((rule, k, template))

    def find(self, name: str, ctx, bounds: dict[str, int]) -> list[tuple[Rule, int, dict[str, int]]]:
        hits = []
        for bucket in (self.by_skeleton.get(DIGITS.sub("#", name), ()), self.wild):
            for rule, k, template in bucket:
                values = template.match(name, ctx) if template.needle in name else None
                if values is not None and all(values.get(v, -1) < b for v, b in bounds.items()):
                    hits.append((rule, k, values))
        return hits


class Mapping:
    """A validated set of name rules. Build with `load_mapping`; `plan` maps source names to
    canonical ones, `plan_to_source` the other way, `inverse` undoes a plan."""

    def __init__(self, name: str, path: str, rules: list[Rule], prefixes: list[str],
                 limits: dict[str, int | str], detect: re.Pattern | None, shared: tuple = ()):
        self.name, self.path, self.rules, self.detect = name, path, tuple(rules), detect
        self.shared = tuple(shared)
        self.prefixes = tuple(sorted(prefixes, key=len, reverse=True))
        self.limits = dict(limits)
        self._forward = _Matcher([(r, k, t) for r in rules for k, t in enumerate(r.sources)])
        self._reverse = _Matcher([(r, k, t) for r in rules if r.op != "skip" and not r.alternative
                                  for k, t in enumerate(r.targets)])

    def __repr__(self):
        return f"Mapping({self.name!r}, {len(self.rules)} rules, from {self.path})"

    def plan(self, shapes: MappingOf[str, tuple[int, ...]], num_hidden_layers: int, *,
             scale_block: int = 128, vocab_size: int | None = None) -> dict[str, Derivation]:
        """Canonical name -> how to make it from the source tensors named in `shapes`. Without
        `vocab_size`, `rows: vocab_size` rules keep every row."""
        return self._build(shapes, num_hidden_layers, scale_block, reverse=False, out_prefix="",
                           vocab_size=vocab_size)

    def plan_to_source(self, shapes: MappingOf[str, tuple[int, ...]], num_hidden_layers: int, *,
                       scale_block: int = 128, prefix: str = "") -> dict[str, Derivation]:
        """Source name -> how to make it from the canonical tensors named in `shapes` (writes a
        checkpoint in this naming; alternative spellings are never produced)."""
        return self._build(shapes, num_hidden_layers, scale_block, reverse=True, out_prefix=prefix)

    def inverse(self, derivations: MappingOf[str, Derivation]) -> dict[str, Derivation]:
        """Undo a plan: source name -> Derivation from the plan's targets (split <-> fuse)."""
        out: dict[str, Derivation] = {}
        pieces: dict[str, dict[int, Derivation]] = {}

        def put(d: Derivation):
            if d.target in out:
                raise MappingError(f"cannot invert: {d.target} would be made twice", file=self.path, tensor=d.target)
            out[d.target] = d

        for d in derivations.values():
            if d.shared:
                continue
            if d.op == "slice":
                raise MappingError("cannot invert a row slice (stacked experts, padded vocabulary)", file=self.path,
                                   tensor=d.target)
            if d.op == "split":
                pieces.setdefault(d.sources[0], {})[d.index] = d
            for k, s in enumerate(d.sources if d.op != "split" else ()):
                put(Derivation(s, (d.target,), "rename") if d.op == "rename" else
                    Derivation(s, (d.target,), "split", d.dim, k, len(d.sources)))
        for source, got in pieces.items():
            first = next(iter(got.values()))
            if sorted(got) != list(range(first.parts)) or {(p.dim, p.parts) for p in got.values()} != \
                    {(first.dim, first.parts)}:
                raise MappingError(f"cannot invert: {source} is split into {first.parts} parts but the plan "
                                   f"has parts {sorted(got)}", file=self.path, tensor=source)
            put(Derivation(source, tuple(got[j].target for j in range(first.parts)), "fuse", first.dim))
        return out

    def _build(self, shapes, num_hidden_layers, block, reverse, out_prefix, vocab_size=None
               ) -> dict[str, Derivation]:
        ctx = {"num_hidden_layers": num_hidden_layers, "vocab_size": vocab_size}
        bounds = {v: term_value(str(b), ctx) for v, b in self.limits.items()}
        problems: dict[str, list[str]] = {}  # kind of problem -> the names it concerns
        groups, out = {}, {}
        matcher = self._reverse if reverse else self._forward

        def add(kind: str, item: str):
            problems.setdefault(kind, []).append(item)

        def emit_stacked(rule, values, name):
            shape = tuple(shapes[name])
            per = math.prod(shape[1:-1]) if len(shape) >= 3 else 0  # rows of one expert
            if not per or per % len(rule.targets):
                return add("shape", f"{name} {list(shape)} is not [experts, rows, columns] with rows in "
                                    f"{len(rule.targets)} equal parts")
            part = per // len(rule.targets)
            for e in range(shape[0]):
                for j, t in enumerate(rule.targets):
                    target = t.format({**values, rule.stacked: e}, ctx)
                    r0 = e * per + j * part
                    if target in out:
                        add("twice", f"{target} (from {', '.join(out[target].sources)} and from {name})")
                    else:
                        out[target] = Derivation(target, (name,), "slice", rows=(r0, r0 + part))

        def emit(rule, in_prefix, values, srcs):
            if rule.stacked is not None and not reverse:
                return emit_stacked(rule, values, srcs[0])
            ins, outs = (rule.targets, rule.sources) if reverse else (rule.sources, rule.targets)
            names = [out_prefix + t.format(values, ctx) for t in outs]
            if len(ins) > 1:
                ds = [Derivation(names[0], srcs, "fuse", rule.dim)]
            elif len(outs) > 1:
                ds = [Derivation(n, srcs, "split", rule.dim, j, len(outs)) for j, n in enumerate(names)]
            elif rule.rows and not reverse and ctx[rule.rows] and len(shapes[srcs[0]]) == 2 and \
                    shapes[srcs[0]][0] > ctx[rule.rows]:  # padded (a shorter one fails the shape check)
                ds = [Derivation(names[0], srcs, "slice", rows=(0, ctx[rule.rows]))]
            else:
                ds = [Derivation(names[0], srcs, "rename")]
            weights = rule.weight and [in_prefix + t.format(values, ctx)
                                       for t in (rule.weight.targets if reverse else rule.weight.sources)]
            bad = _shape_problem(ds[0], shapes, weights, block)
            if bad:
                return add("shape", bad)
            for d in ds:
                if d.target in out:
                    add("twice",
                        f"{d.target} (from {', '.join(out[d.target].sources)} and from {', '.join(d.sources)})")
                else:
                    out[d.target] = d

        for name in shapes:
            in_prefix = "" if reverse else next((p for p in self.prefixes if name.startswith(p)), "")
            hits = matcher.find(name[len(in_prefix):], ctx, bounds)
            if not hits:
                add("unmatched", name)
                continue
            if len(hits) > 1:
                add("ambiguous", f"{name} ({' and '.join(h[0].label for h in hits)})")
                continue
            rule, k, values = hits[0]
            if rule.op == "skip":
                continue
            if len(rule.targets if reverse else rule.sources) == 1:
                emit(rule, in_prefix, values, (name,))
            else:  # one of several inputs: wait for its partners
                key = (id(rule), in_prefix, tuple(sorted(values.items())))
                groups.setdefault(key, (rule, in_prefix, values, {}))[3][k] = name
        for rule, in_prefix, values, got in groups.values():
            ins = rule.targets if reverse else rule.sources
            if len(got) < len(ins):
                missing = [in_prefix + t.format(values, ctx) for k, t in enumerate(ins) if k not in got]
                add("partner", f"{', '.join(missing)} (partner of {next(iter(got.values()))})")
            else:
                emit(rule, in_prefix, values, tuple(got[k] for k in range(len(ins))))
        for shared in () if reverse else self.shared:
            for name in shapes:
                in_prefix = next((p for p in self.prefixes if name.startswith(p)), "")
                values = shared.when.match(name[len(in_prefix):], ctx)
                target = values is not None and shared.target.format(values, ctx)
                if target and shared.same_as in out and target not in out:
                    out[target] = dataclasses.replace(out[shared.same_as], target=target, shared=True)
        if problems:
            raise MappingError(f"mapping '{self.name}': " + "; ".join(
                f"{len(v)} {_PROBLEMS[kind][len(v) > 1]}: "
                f"{', '.join(v[:_SHOWN])}{', ...' if len(v) > _SHOWN else ''}"
                for kind, v in problems.items()), file=self.path)
        return out


def _shape_problem(d: Derivation, shapes, weights: list[str] | None, block: int) -> str | None:
    if weights is not None:  # d makes or splits an FP8 scale: its weight decides whether it can
        absent = [w for w in weights if w not in shapes]
        if absent:
            return f"{', '.join(d.sources)} is an FP8 scale without its weight {', '.join(absent)}"
        for w in weights if d.op != "rename" else ():
            if len(shapes[w]) <= d.dim or shapes[w][d.dim] // (d.parts if d.op == "split" else 1) % block:
                return (f"{', '.join(d.sources)}: {d.op} of FP8 scale needs parts of weight {w} {list(shapes[w])} "
                        f"to be multiples of the {block}-element scale block along dim {d.dim}")
    shape = tuple(shapes[d.sources[0]])
    if d.op != "rename" and d.dim >= len(shape):
        return f"{d.sources[0]} {list(shape)} has no dim {d.dim}"
    if d.op == "split" and shape[d.dim] % d.parts:
        return f"{d.sources[0]} {list(shape)} does not split into {d.parts} equal parts along dim {d.dim}"
    if d.op == "fuse" and any(tuple(shapes[s]) != shape for s in d.sources):
        return f"{', '.join(d.sources)} differ in shape ({[list(shapes[s]) for s in d.sources]}), cannot fuse"
    return None


def derived_shape(d: Derivation, shapes: MappingOf[str, tuple[int, ...]]) -> tuple[int, ...]:
    shape = list(shapes[d.sources[0]])
    if d.op == "slice":
        return (d.rows[1] - d.rows[0], *shape[-1:]) if len(shape) > 1 else (d.rows[1] - d.rows[0],)
    if d.op == "split":
        shape[d.dim] //= d.parts
    elif d.op == "fuse":
        shape[d.dim] = sum(shapes[s][d.dim] for s in d.sources)
    return tuple(shape)


def materialize(d: Derivation, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Make `d.target` from the tensors `load` returns; the result is contiguous."""
    if d.op == "fuse":
        return torch.cat([load(s) for s in d.sources], dim=d.dim)
    t = load(d.sources[0])
    if d.op == "slice":
        return (t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t)[d.rows[0]:d.rows[1]].contiguous()
    if d.op == "split":
        size, rest = divmod(t.shape[d.dim], d.parts)
        if rest:
            raise MappingError(f"shape {list(t.shape)} does not split into {d.parts} parts along dim {d.dim}",
                               tensor=d.sources[0])
        t = t.narrow(d.dim, d.index * size, size)
    return t.contiguous()


def load_mapping(name_or_path: str) -> Mapping:
    """A built-in mapping ("hf", "megatron", "deepseek", "torchtitan") or a YAML file, validated."""
    if name_or_path in BUILTIN:
        return _builtin_mapping(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise MappingError(f"no mapping {name_or_path!r}: use one of {', '.join(BUILTIN)} or a YAML file path")
    return _read_mapping(path)


@functools.lru_cache(maxsize=None)
def _builtin_mapping(name: str) -> Mapping:
    """A built-in mapping, parsed once per process (package data; a Mapping is not changed after it
    is built): detecting the naming reads every one of them, and each conversion process again."""
    return _read_mapping(_builtin_dir() / f"{name}.yaml")


def _read_mapping(path) -> Mapping:
    spec = read_rule_file(path)
    return Mapping(spec.name, str(path), spec.rules, spec.prefixes, spec.limits, spec.detect, spec.shared)


def detect_mapping(names: Iterable[str]) -> str:
    """The built-in mapping whose `detect` patterns fit these tensor names."""
    names = list(names)
    patterns = {n: load_mapping(n).detect for n in BUILTIN}
    hits = {n: {x for x in names if pattern.match(x)} for n, pattern in patterns.items()}
    fits = [n for n, got in hits.items() if got]
    if len(fits) > 1:  # names two namings share (torchtitan's lm_head.weight) tell nothing
        fits = [n for n in fits if hits[n] - set().union(*(hits[m] for m in fits if m != n))] or fits
    if len(fits) == 1:
        return fits[0]
    shown = ", ".join(names[:3]) or "no names at all"
    if not fits:
        raise MappingError(f"cannot tell the naming of {len(names)} tensors ({shown}, ...): none of "
                           f"{', '.join(BUILTIN)} fits; give a mapping name or YAML file")
    raise MappingError(f"{len(names)} tensor names fit several namings ({', '.join(fits)}); give one explicitly")


def _builtin_dir():
    return yaml_data.builtin_dir("mappings")

