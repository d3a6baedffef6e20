"""Rule files of the name mapping stage: read, parse and validate `mappings/*.yaml` (format
described in `mappings/hf.yaml`) into compiled rules. A rule's names are `Template`s, compiled to
regexes that match tensor names into placeholder values and format values back into names.
`converter.mapping.names` builds a `Mapping` from what `parse_rule_file` returns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping as MappingOf

import yaml

from converter import yaml_data
from converter.errors import MappingError

CONTEXT_VARS = ("num_hidden_layers", "vocab_size")  # names a rule's {expression} may use besides placeholders
CANONICAL_SCALE = "weight_scale_inv"
_TOP_KEYS = {"name", "description", "detect", "prefixes", "scale_suffix", "limits", "rulesets", "rules", "shared"}
_RULE_KEYS = {
    "rename": {"op", "source", "target", "scaled", "alternative", "stacked", "rows"},
    "split": {"op", "source", "targets", "dim", "scaled", "alternative", "stacked"},
    "fuse": {"op", "sources", "target", "dim", "scaled", "alternative"},
    "skip": {"op", "source"},
    "include": {"op", "include", "source", "target"},
}
_FIELD = re.compile(r"\{([^{}]*)\}")
_TERM = re.compile(r"\s*([+-]?)\s*([A-Za-z]\w*|[0-9]+)\s*")
_NUMBER = "(?:0|[1-9][0-9]*)"  # no leading zeros, so formatting a matched value gives the name back
DIGITS = re.compile(r"[0-9]+")
_WEIGHT_TOKEN = re.compile(r"(?<![\w])weight(?![A-Za-z_])")


class Template:
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
                skeleton.append(DIGITS.sub("\0", piece))
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
    return sum(-term_value(t, ctx) if s == "-" else term_value(t, ctx) for s, t in terms)


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


def term_value(term: str, ctx: MappingOf[str, int]) -> int:
    return int(term) if term.isdigit() else ctx[term]


@dataclass(frozen=True, eq=False)
class Rule:
    label: str
    op: str
    sources: tuple[Template, ...]
    targets: tuple[Template, ...]
    dim: int = 0
    alternative: bool = False  # an extra source spelling: read, never written by plan_to_source
    weight: "Rule | None" = None  # set on the FP8 scale rule generated from a `scaled` rule
    stacked: str | None = None  # the source's dim 0 is this placeholder (stacked experts); read only
    rows: str | None = None  # keep the first (context value) rows: a vocabulary padded for parallelism


@dataclass(frozen=True)
class Shared:
    """A tensor the source shares instead of storing: for each name matching `when`, `target` is
    made exactly as the canonical tensor `same_as` is (Megatron's MTP embedding and head)."""

    when: Template
    target: Template
    same_as: str


@dataclass(frozen=True)
class RuleFile:
    """A parsed, validated rule file: what `converter.mapping.names.Mapping` is built from."""

    name: str
    rules: list[Rule]
    prefixes: list[str]
    limits: dict[str, int | str]
    detect: re.Pattern
    shared: tuple[Shared, ...] = ()


def read_rule_file(path) -> RuleFile:
    """Read and parse a rule file; `path` is a `Path` or a package resource (`Traversable`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MappingError(f"cannot read mapping: {e}", file=str(path)) from None
    return parse_rule_file(text, str(path), Path(str(path)).stem)


def parse_rule_file(text: str, file: str, stem: str) -> RuleFile:
    def fail(msg):
        raise MappingError(msg, file=file)

    try:
        data = yaml_data.safe_load(text)
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
    shared = data.get("shared") or []
    if not isinstance(shared, list) or not all(isinstance(s, dict) and set(s) == {"when", "target", "same_as"} and
                                               all(isinstance(v, str) and v for v in s.values()) for s in shared):
        fail("`shared` must be a list of {when: NAME, target: NAME, same_as: CANONICAL NAME}")
    try:
        shared_rules = tuple(Shared(Template(s["when"], "shared"), Template(s["target"], "shared"), s["same_as"])
                             for s in shared)
    except MappingError as e:
        fail(e.message)
    return RuleFile(str(data.get("name", stem)), built, prefixes,
                    {str(k): v["below"] for k, v in limits.items()}, detect_re, shared_rules)


def _parse_rules(rules, rulesets, scale_suffix, fail) -> list[Rule]:
    built: list[Rule] = []
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


def _parse_rule(raw, label, scale_suffix, fail, src_prefix, tgt_prefix) -> list[Rule]:
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
    stacked, rows = raw.get("stacked"), raw.get("rows")
    if stacked is not None and (not isinstance(stacked, str) or not stacked.isidentifier() or scaled or dim):
        fail(f"{label}: `stacked` names the placeholder of the source's dim 0 (e.g. e); not with `scaled` "
             "or a `dim` other than 0")
    if rows is not None and rows not in CONTEXT_VARS:
        fail(f"{label}: `rows` must be one of {', '.join(CONTEXT_VARS)}")
    alternative = alternative or stacked is not None  # read only: plan_to_source never stacks
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        fail(f"{label}: `dim` must be a non-negative integer, not {dim!r}")
    if not isinstance(scaled, bool) or not isinstance(alternative, bool):
        fail(f"{label}: `scaled` and `alternative` must be true or false")
    sources = tuple(Template(src_prefix + s, f"{label}") for s in srcs)
    targets = tuple(Template(tgt_prefix + t, f"{label}") for t in tgts)
    if op != "skip":
        if any(t.wild for t in sources + targets):
            fail(f"{label}: {{*}} is only allowed in skip rules")
        tvars = set().union(*(t.vars for t in targets)) - {stacked}
        for s in sources:
            if set(s.vars) != tvars:
                extra, lost = sorted(tvars - set(s.vars)), sorted(set(s.vars) - tvars)
                fail(f"{label}: " + (f"placeholder(s) {extra} used in target but not in source '{s.text}'" if extra
                                     else f"placeholder(s) {lost} of '{s.text}' missing from the target "
                                          f"(the rule could not be inverted)"))
    rule = Rule(label, op, sources, targets, dim, alternative, stacked=stacked, rows=rows)
    if not scaled:
        return [rule]
    if op == "skip" or not all(t.text.endswith(".weight") for t in targets) or \
            not all(_WEIGHT_TOKEN.search(s.text) for s in sources):
        fail(f"{label}: `scaled` needs sources with a `weight` part and targets ending in '.weight'")

    def scale_of(text, suffix):
        last = list(_WEIGHT_TOKEN.finditer(text))[-1]
        return Template(text[:last.start()] + suffix + text[last.end():], f"{label} (scale)")

    return [rule, Rule(f"{label} (scale)", op, tuple(scale_of(s.text, scale_suffix) for s in sources),
                        tuple(scale_of(t.text, CANONICAL_SCALE) for t in targets), dim, alternative, rule)]
