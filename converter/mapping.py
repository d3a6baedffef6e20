"""Name mapping stage: turn a source checkpoint's tensor names into the canonical Hugging Face
DeepSeek V3 names (SPEC 1) as a plan of renames, splits and fuses. The rules are data
(`mappings/*.yaml`, format described in `mappings/hf.yaml`); everything here works from names
and shapes only, except `materialize`, which cuts or joins tensors the plan names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable
from typing import Mapping as MappingOf

import torch
import yaml

from converter.errors import MappingError

BUILTIN = ("hf", "megatron", "deepseek")
CONTEXT_VARS = ("num_hidden_layers",)  # names a rule's {expression} may use besides placeholders
CANONICAL_SCALE = "weight_scale_inv"
_TOP_KEYS = {"name", "description", "detect", "prefixes", "scale_suffix", "limits", "rulesets", "rules"}
_RULE_KEYS = {
    "rename": {"op", "source", "target", "scaled", "alternative"},
    "split": {"op", "source", "targets", "dim", "scaled", "alternative"},
    "fuse": {"op", "sources", "target", "dim", "scaled", "alternative"},
    "skip": {"op", "source"},
    "include": {"op", "include", "source", "target"},
}
_FIELD = re.compile(r"\{([^{}]*)\}")
_TERM = re.compile(r"\s*([+-]?)\s*([A-Za-z]\w*|[0-9]+)\s*")
_NUMBER = "(?:0|[1-9][0-9]*)"  # no leading zeros, so formatting a matched value gives the name back
_DIGITS = re.compile(r"[0-9]+")
_WEIGHT_TOKEN = re.compile(r"(?<![\w])weight(?![A-Za-z_])")
_SHOWN = 5  # names quoted per problem in an error message


@dataclass(frozen=True)
class Derivation:
    """How one tensor is made from others: `rename` (one source), `split` (part `index` of
    `parts` equal parts of one source along `dim`) or `fuse` (sources concatenated along `dim`)."""

    target: str
    sources: tuple[str, ...]
    op: str
    dim: int = 0
    index: int = 0
    parts: int = 1

    def __post_init__(self):
        want = {"rename": len(self.sources) == 1, "split": len(self.sources) == 1,
                "fuse": len(self.sources) >= 2}
        if not want.get(self.op, False):
            raise MappingError(f"bad derivation {self.op} of {len(self.sources)} source(s)", tensor=self.target)


class _Template:
    """A tensor name with fields: `{L}` (a placeholder, a non-negative integer),
    `{num_hidden_layers + i}` (an offset, solved for `i` when matching) and `{*}` (anything; skip
    rules only). Matches names into placeholder values and formats values back into names."""

    def __init__(self, text: str, where: str):
        pieces = _FIELD.split(text)  # literal, field, literal, ..., literal
        if any("{" in p or "}" in p for p in pieces[::2]):
            raise MappingError(f"{where}: unbalanced braces in '{text}'")
        self.text, self.vars, self.exprs = text, [], []
        regex, fmt, skeleton, key = [], [], [], []  # skeleton: "\0" digits or field, "\1" wildcard
        for n, piece in enumerate(pieces):
            body = piece.strip()
            if n % 2 == 0:
                regex.append(re.escape(piece)), fmt.append(piece), key.append(piece)
                skeleton.append(_DIGITS.sub("\0", piece))
            elif body == "*":
                regex.append(".*"), skeleton.append("\1"), key.append("{*}")
            else:
                terms = _parse_expression(body, f"{where}: field {{{body}}} of '{text}'")
                var = next(t for _, t in terms if t.isidentifier() and t not in CONTEXT_VARS)
                if var in self.vars:
                    raise MappingError(f"{where}: placeholder {{{var}}} used twice in '{text}'")
                self.vars.append(var)
                group = var if len(terms) == 1 else f"_{n}"  # placeholders never start with "_"
                if len(terms) > 1:
                    self.exprs.append((group, var, tuple((s, t) for s, t in terms if t != var)))
                regex.append(f"(?P<{group}>{_NUMBER})"), fmt.append("{" + group + "}"), skeleton.append("\0")
                key.append("{}" if len(terms) == 1 else "{" + " ".join(s + t for s, t in terms) + "}")
        self.regex, self.fmt, self.key = re.compile("".join(regex)), "".join(fmt), "".join(key)
        joined = re.sub("\0+", "#", "".join(skeleton))  # digit runs collapse to one "#", as in names
        self.wild = "\1" in joined
        self.skeleton = None if self.wild else joined  # None: no exact pre-filter, try it on every name
        self.needle = max(re.split("[\0\1]", "".join(skeleton)), key=len)  # in every name that matches

    def match(self, name: str, ctx: MappingOf[str, int]) -> dict[str, int] | None:
        m = self.regex.fullmatch(name)
        if m is None:
            return None
        values = {k: int(v) for k, v in m.groupdict().items()}
        for group, var, rest in self.exprs:
            values[var] = values.pop(group) - _sum(rest, ctx)
            if values[var] < 0:
                return None
        return values

    def format(self, values: MappingOf[str, int], ctx: MappingOf[str, int]) -> str:
        if self.exprs:
            values = dict(values)
            for group, var, rest in self.exprs:
                values[group] = values[var] + _sum(rest, ctx)
                if values[group] < 0:
                    raise MappingError(f"'{self.text}' gives a negative number for {values}")
        return self.fmt.format_map(values)


def _sum(terms, ctx) -> int:
    return sum(-_value(t, ctx) if s == "-" else _value(t, ctx) for s, t in terms)


def _parse_expression(body: str, where: str) -> list[tuple[str, str]]:
    terms, pos = [], 0
    while pos < len(body):
        m = _TERM.match(body, pos)
        if m is None or m.end() == pos or (terms and not m[1]) or (not terms and m[1] == "-"):
            raise MappingError(f"{where}: expected `name`, or `name + offset` with one placeholder")
        terms.append((m[1] or "+", m[2]))
        pos = m.end()
    placeholders = [(s, t) for s, t in terms if t.isidentifier() and t not in CONTEXT_VARS]
    if len(placeholders) != 1 or placeholders[0][0] != "+":
        raise MappingError(f"{where}: needs exactly one placeholder, added (context names: "
                           f"{', '.join(CONTEXT_VARS)})")
    return terms


def _value(term: str, ctx: MappingOf[str, int]) -> int:
    return int(term) if term.isdigit() else ctx[term]


@dataclass(frozen=True, eq=False)
class _Rule:
    label: str
    op: str
    sources: tuple[_Template, ...]
    targets: tuple[_Template, ...]
    dim: int = 0
    alternative: bool = False  # an extra source spelling: read, never written by plan_to_source
    weight: "_Rule | None" = None  # set on the FP8 scale rule generated from a `scaled` rule


class _Matcher:
    """Finds every (rule, side index) whose template matches a name. Templates are bucketed by
    skeleton (digit runs replaced by '#') so a name is tried against one or two regexes, not all."""

    def __init__(self, entries):
        self.by_skeleton, self.wild = {}, []
        for rule, k, template in entries:
            bucket = self.wild if template.skeleton is None else self.by_skeleton.setdefault(template.skeleton, [])
            bucket.append((rule, k, template))

    def find(self, name: str, ctx, bounds: dict[str, int]) -> list[tuple[_Rule, int, dict[str, int]]]:
        hits = []
        for bucket in (self.by_skeleton.get(_DIGITS.sub("#", name), ()), self.wild):
            for rule, k, template in bucket:
                values = template.match(name, ctx) if template.needle in name else None
                if values is not None and all(values.get(v, -1) < b for v, b in bounds.items()):
                    hits.append((rule, k, values))
        return hits


class Mapping:
    """A validated set of name rules. Build with `load_mapping`; `plan` maps source names to
    canonical ones, `plan_to_source` the other way, `inverse` undoes a plan."""

    def __init__(self, name: str, path: str, rules: list[_Rule], prefixes: list[str],
                 limits: dict[str, int | str], detect: re.Pattern | None):
        self.name, self.path, self.rules, self.detect = name, path, tuple(rules), detect
        self.prefixes = tuple(sorted(prefixes, key=len, reverse=True))
        self.limits = dict(limits)
        self._forward = _Matcher([(r, k, t) for r in rules for k, t in enumerate(r.sources)])
        self._reverse = _Matcher([(r, k, t) for r in rules if r.op != "skip" and not r.alternative
                                  for k, t in enumerate(r.targets)])

    def __repr__(self):
        return f"Mapping({self.name!r}, {len(self.rules)} rules, from {self.path})"

    def plan(self, shapes: MappingOf[str, tuple[int, ...]], num_hidden_layers: int, *,
             scale_block: int = 128) -> dict[str, Derivation]:
        """Canonical name -> how to make it from the source tensors named in `shapes`."""
        return self._build(shapes, num_hidden_layers, scale_block, reverse=False, out_prefix="")

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

    def _build(self, shapes, num_hidden_layers, block, reverse, out_prefix) -> dict[str, Derivation]:
        ctx = {"num_hidden_layers": num_hidden_layers}
        bounds = {v: _value(str(b), ctx) for v, b in self.limits.items()}
        problems: dict[str, list[str]] = {}  # kind of problem -> the names it concerns
        groups, out = {}, {}
        matcher = self._reverse if reverse else self._forward

        def add(kind: str, item: str):
            problems.setdefault(kind, []).append(item)

        def emit(rule, in_prefix, values, srcs):
            ins, outs = (rule.targets, rule.sources) if reverse else (rule.sources, rule.targets)
            names = [out_prefix + t.format(values, ctx) for t in outs]
            if len(ins) > 1:
                ds = [Derivation(names[0], srcs, "fuse", rule.dim)]
            elif len(outs) > 1:
                ds = [Derivation(n, srcs, "split", rule.dim, j, len(outs)) for j, n in enumerate(names)]
            else:
                ds = [Derivation(names[0], srcs, "rename")]
            weights = rule.weight and [in_prefix + t.format(values, ctx)
                                       for t in (rule.weight.targets if reverse else rule.weight.sources)]
            bad = _shape_problem(ds[0], shapes, weights, block)
            if bad:
                return add("tensors with unusable shapes", bad)
            for d in ds:
                if d.target in out:
                    add("targets produced twice",
                        f"{d.target} (from {', '.join(out[d.target].sources)} and from {', '.join(d.sources)})")
                else:
                    out[d.target] = d

        for name in shapes:
            in_prefix = "" if reverse else next((p for p in self.prefixes if name.startswith(p)), "")
            hits = matcher.find(name[len(in_prefix):], ctx, bounds)
            if not hits:
                add("tensors match no rule", name)
                continue
            if len(hits) > 1:
                add("tensors match several rules", f"{name} ({' and '.join(h[0].label for h in hits)})")
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
                add("fuse inputs missing", f"{', '.join(missing)} (partner of {next(iter(got.values()))})")
            else:
                emit(rule, in_prefix, values, tuple(got[k] for k in range(len(ins))))
        if problems:
            raise MappingError(f"mapping '{self.name}': " + "; ".join(
                f"{len(v)} {kind}: {', '.join(v[:_SHOWN])}{', ...' if len(v) > _SHOWN else ''}"
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
    if d.op == "split":
        size, rest = divmod(t.shape[d.dim], d.parts)
        if rest:
            raise MappingError(f"shape {list(t.shape)} does not split into {d.parts} parts along dim {d.dim}",
                               tensor=d.sources[0])
        t = t.narrow(d.dim, d.index * size, size)
    return t.contiguous()


def load_mapping(name_or_path: str) -> Mapping:
    """A built-in mapping ("hf", "megatron", "deepseek") or a YAML file, validated."""
    if name_or_path in BUILTIN:
        path = _builtin_dir() / f"{name_or_path}.yaml"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise MappingError(f"no mapping {name_or_path!r}: use one of {', '.join(BUILTIN)} or a YAML file path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(f"cannot read mapping: {e}", file=str(path)) from None
    return _parse(text, str(path), Path(str(path)).stem)


def detect_mapping(names: Iterable[str]) -> str:
    """The built-in mapping whose `detect` patterns fit these tensor names."""
    names = list(names)
    patterns = {n: load_mapping(n).detect for n in BUILTIN}
    fits = [n for n, pattern in patterns.items() if any(pattern.match(x) for x in names)]
    if len(fits) == 1:
        return fits[0]
    shown = ", ".join(names[:3]) or "no names at all"
    if not fits:
        raise MappingError(f"cannot tell the naming of {len(names)} tensors ({shown}, ...): none of "
                           f"{', '.join(BUILTIN)} fits; give a mapping name or YAML file")
    raise MappingError(f"{len(names)} tensor names fit several namings ({', '.join(fits)}); give one explicitly")


def _builtin_dir():
    try:
        return resources.files("converter.mappings")
    except ModuleNotFoundError:  # running from a source tree that was not pip-installed
        return Path(__file__).resolve().parent.parent / "mappings"


def _parse(text: str, file: str, stem: str) -> Mapping:
    def fail(msg):
        raise MappingError(msg, file=file)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        fail(f"not valid YAML: {e}")
    if not isinstance(data, dict):
        fail("a mapping file must be a YAML mapping with a `rules` list")
    if set(data) - _TOP_KEYS:
        fail(f"unknown key(s) {sorted(set(data) - _TOP_KEYS)}; allowed: {sorted(_TOP_KEYS)}")
    rules, rulesets = data.get("rules"), data.get("rulesets") or {}
    if not isinstance(rules, list) or not rules or not isinstance(rulesets, dict):
        fail("`rules` must be a non-empty list and `rulesets` a mapping of name -> list of rules")
    scale_suffix = data.get("scale_suffix", CANONICAL_SCALE)
    prefixes, limits, detect = data.get("prefixes") or [], data.get("limits") or {}, data.get("detect") or []
    if not isinstance(scale_suffix, str) or not scale_suffix.isidentifier():
        fail(f"`scale_suffix` must be a name like weight_scale_inv, not {scale_suffix!r}")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p.endswith(".") for p in prefixes):
        fail("`prefixes` must be a list of strings ending in '.'")
    if not isinstance(limits, dict) or not all(isinstance(v, dict) and set(v) == {"below"} and
                                               (isinstance(v["below"], int) or v["below"] in CONTEXT_VARS)
                                               for v in limits.values()):
        fail(f"`limits` must map a placeholder to {{below: N or one of {', '.join(CONTEXT_VARS)}}}")
    try:
        detect_re = re.compile("|".join(f"(?:{p})" for p in detect) or "(?!)")
    except (re.error, TypeError) as e:
        fail(f"bad `detect` pattern: {e}")
    try:
        built = _parse_rules(rules, rulesets, scale_suffix, fail)
    except MappingError as e:  # raised while parsing a name template, which does not know the file
        if e.file is None:
            fail(e.message)
        raise
    return Mapping(str(data.get("name", stem)), file, built, prefixes,
                   {str(k): v["below"] for k, v in limits.items()}, detect_re)


def _parse_rules(rules, rulesets, scale_suffix, fail) -> list[_Rule]:
    built: list[_Rule] = []
    for i, raw in enumerate(rules, 1):
        if isinstance(raw, dict) and ("include" in raw or raw.get("op") == "include"):
            _check_keys(raw, "include", f"rule {i}", fail)
            name = raw.get("include")
            if name not in rulesets or not isinstance(rulesets[name], list):
                fail(f"rule {i}: no ruleset {name!r} (have {sorted(rulesets)})")
            src = raw.get("source", "")
            tgt = raw.get("target", src)
            if not isinstance(src, str) or not isinstance(tgt, str):
                fail(f"rule {i}: include prefixes must be strings")
            for j, inner in enumerate(rulesets[name], 1):
                built += _parse_rule(inner, f"rule {i} ({name} #{j})", scale_suffix, fail, src, tgt)
        else:
            built += _parse_rule(raw, f"rule {i}", scale_suffix, fail, "", "")
    for side in ("sources", "targets"):
        seen = {}
        for r in built:
            if side == "targets" and (r.op == "skip" or r.alternative):
                continue
            for t in getattr(r, side):
                if t.key in seen and seen[t.key] is not r:
                    fail(f"duplicate rules: {seen[t.key].label} and {r.label} both {side[:-1]} '{t.text}'")
                seen[t.key] = r
    return built


def _check_keys(raw: dict, op: str, label: str, fail):
    if set(raw) - _RULE_KEYS[op]:
        fail(f"{label}: unknown key(s) {sorted(set(raw) - _RULE_KEYS[op])} for a {op} rule; "
             f"allowed: {sorted(_RULE_KEYS[op])}")


def _parse_rule(raw, label, scale_suffix, fail, src_prefix, tgt_prefix) -> list[_Rule]:
    if not isinstance(raw, dict):
        fail(f"{label}: a rule must be a mapping, not {raw!r}")
    op = raw.get("op") or ("split" if "targets" in raw else "fuse" if "sources" in raw else "rename")
    if op not in _RULE_KEYS or op == "include" and src_prefix + tgt_prefix:
        fail(f"{label}: bad op {op!r}; use one of rename, split, fuse, skip (include only at top level)")
    _check_keys(raw, op, label, fail)
    one = raw.get("source")
    srcs = raw.get("sources") if op == "fuse" else [one]
    tgts = [] if op == "skip" else raw.get("targets") if op == "split" else [raw.get("target", one)]
    arity = {"rename": "one source and one target", "split": "one source and 2 or more targets",
             "fuse": "2 or more sources and one target", "skip": "one source"}[op]
    if not isinstance(srcs, list) or not isinstance(tgts, list) or \
            not all(isinstance(n, str) and n for n in srcs + tgts) or \
            not (len(srcs) >= 2 if op == "fuse" else len(srcs) == 1) or \
            not (len(tgts) >= 2 if op == "split" else len(tgts) == (op != "skip")):
        fail(f"{label}: a {op} rule needs {arity} (non-empty strings), got sources {srcs!r}, targets {tgts!r}")
    dim, scaled, alternative = raw.get("dim", 0), raw.get("scaled", False), raw.get("alternative", False)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        fail(f"{label}: `dim` must be a non-negative integer, not {dim!r}")
    if not isinstance(scaled, bool) or not isinstance(alternative, bool):
        fail(f"{label}: `scaled` and `alternative` must be true or false")
    sources = tuple(_Template(src_prefix + s, f"{label}") for s in srcs)
    targets = tuple(_Template(tgt_prefix + t, f"{label}") for t in tgts)
    if op != "skip":
        if any(t.wild for t in sources + targets):
            fail(f"{label}: {{*}} is only allowed in skip rules")
        tvars = set().union(*(t.vars for t in targets))
        for s in sources:
            if set(s.vars) != tvars:
                extra, lost = sorted(tvars - set(s.vars)), sorted(set(s.vars) - tvars)
                fail(f"{label}: " + (f"placeholder(s) {extra} used in target but not in source '{s.text}'" if extra
                                     else f"placeholder(s) {lost} of '{s.text}' missing from the target "
                                          f"(the rule could not be inverted)"))
    rule = _Rule(label, op, sources, targets, dim, alternative)
    if not scaled:
        return [rule]
    if op == "skip" or not all(t.text.endswith(".weight") for t in targets) or \
            not all(_WEIGHT_TOKEN.search(s.text) for s in sources):
        fail(f"{label}: `scaled` needs sources with a `weight` part and targets ending in '.weight'")

    def scale_of(text, suffix):
        last = list(_WEIGHT_TOKEN.finditer(text))[-1]
        return _Template(text[:last.start()] + suffix + text[last.end():], f"{label} (scale)")

    return [rule, _Rule(f"{label} (scale)", op, tuple(scale_of(s.text, scale_suffix) for s in sources),
                        tuple(scale_of(t.text, CANONICAL_SCALE) for t in targets), dim, alternative, rule)]
