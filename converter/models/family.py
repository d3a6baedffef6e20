"""Model families as data: `families/*.yaml` (package `converter.families`), one file per family,
read and validated here. A family says which configs it is (architectures, model_type), which
config keys its shapes are made of, every tensor a checkpoint of it holds (names and shapes as
expressions of config keys), which linears the FP8 release stores block-quantized, which modules
must never be MXFP8, which recipes and name mappings apply, and how SGLang and transformers serve
it. The format is described in `families/deepseek_v3.yaml`.

Everything that used to know "DeepSeek V3" (the architecture check, preflight's expected tensors,
the demo builder, verify's always-high-precision list, the default recipe, the logits model, the
model card) asks the family instead.
"""

from __future__ import annotations

import ast
import functools
import operator
from dataclasses import dataclass
from pathlib import Path

import yaml

from converter import yaml_data
from converter.errors import RecipeError, SourceError

_TOP_KEYS = {"name", "description", "extends", "architectures", "model_types", "config", "optional_config",
             "checks", "experts", "mtp_layers", "moe_layer", "tensors", "fp8_release", "high_precision",
             "recipes", "mappings", "logits", "card_kept", "demo_config"}
_TENSOR_KEYS = {"name", "shape", "when", "dtype", "optional", "experts"}
_SECTIONS = ("global", "layer", "global_end")
_DTYPES = ("BF16", "F32")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


class Expr:
    """A small arithmetic/boolean expression over config keys (and `layer`, `moe`, `mtp`):
    names, integers, + - * // %, comparisons, `in`, and/or/not. Parsed once, evaluated safely
    (no calls, no attributes); an absent config key is None."""

    def __init__(self, text: object, where: str):
        self.text = str(text)
        try:
            self.tree = ast.parse(self.text, mode="eval").body
            self._check(self.tree)
        except (SyntaxError, ValueError) as e:
            raise SourceError(f"{where}: bad expression {self.text!r}: {e}") from None

    def _check(self, node: ast.AST) -> None:
        allowed = (ast.Name, ast.Constant, ast.BinOp, ast.BoolOp, ast.UnaryOp, ast.Compare, ast.List, ast.Tuple)
        if not isinstance(node, allowed) or isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS or \
                isinstance(node, ast.Compare) and any(type(o) not in _CMPOPS for o in node.ops) or \
                isinstance(node, ast.UnaryOp) and not isinstance(node.op, (ast.Not, ast.USub)):
            raise ValueError(f"{type(node).__name__} is not allowed")
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.expr_context)):
                self._check(child)

    @property
    def names(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)}

    def __call__(self, env: dict) -> object:
        """The value in `env`; a config that makes it meaningless (a missing key in arithmetic, a
        list where a number belongs) is a SourceError naming the expression."""
        try:
            return self._eval(self.tree, env)
        except (TypeError, ZeroDivisionError) as e:
            raise SourceError(f"config.json does not give {self.text!r} a value ({e})") from None

    def _eval(self, node: ast.AST, env: dict) -> object:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(e, env) for e in node.elts]
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, env), self._eval(node.right, env))
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, env)
            return (not v) if isinstance(node.op, ast.Not) else -v
        if isinstance(node, ast.BoolOp):
            v = None
            for value in node.values:
                v = self._eval(value, env)
                if bool(v) == isinstance(node.op, ast.Or):
                    return v
            return v
        left = self._eval(node.left, env)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self._eval(right_node, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True


@dataclass(frozen=True)
class TensorRule:
    name: str  # relative to its section's prefix; may hold {e} inside an experts group
    shape: tuple[Expr, ...]
    when: Expr | None
    dtype: str
    optional: bool  # may be absent (e.g. MTP copies of the embedding that trainers share)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    config: dict[str, int]  # required integer keys -> smallest valid value
    optional_config: dict[str, int]
    checks: tuple[tuple[Expr, str], ...]
    experts: str  # config key: number of routed experts
    mtp_layers: Expr
    moe_layer: Expr
    sections: dict[str, tuple]  # "global" / "layer" / "global_end" -> rules; groups are (Expr | None, rules)
    fp8_release: tuple[str, ...]
    high_precision: tuple[str, ...]
    recipes: dict[str, str]
    mappings: tuple[str, ...]
    logits: dict | None
    card_kept: str  # the model card's sentence on what stays high precision and why
    demo_config: dict
    source: str

    def env(self, config: dict) -> dict:
        return {k: v for k, v in config.items() if isinstance(k, str)}

    def check_config(self, config: dict, path: str | Path) -> None:
        """The config's shape keys are usable integers and its family rules hold."""
        for key, minimum in self.config.items():
            _config_int(config, key, minimum, path, self.name, required=True)
        for key, minimum in self.optional_config.items():
            _config_int(config, key, minimum, path, self.name, required=False)
        env = self.env(config)
        for expr, message in self.checks:
            try:
                ok = expr(env)
            except SourceError:
                ok = False
            if not ok:
                raise SourceError(f"config.json: {message} ({expr.text})", file=path)

    def n_experts(self, config: dict) -> int:
        return int(config.get(self.experts) or 0)

    def n_mtp(self, config: dict) -> int:
        return int(self.mtp_layers(self.env(config)) or 0)

    def is_moe_layer(self, config: dict, layer: int) -> bool:
        return bool(self.moe_layer(dict(self.env(config), layer=layer)))

    def tensors(self, config: dict) -> dict[str, tuple[tuple[int, ...], str, bool]]:
        """Every tensor of a high-precision checkpoint of this family with this config, in the
        family file's order: name -> (shape, dtype, optional)."""
        env = self.env(config)
        out: dict[str, tuple[tuple[int, ...], str, bool]] = {}
        self._expand(self.sections["global"], "", env, out)
        n_layers = int(config["num_hidden_layers"])
        for layer in range(n_layers + self.n_mtp(config)):
            lenv = dict(env, layer=layer, moe=self.is_moe_layer(config, layer), mtp=layer >= n_layers)
            self._expand(self.sections["layer"], f"model.layers.{layer}.", lenv, out)
        self._expand(self.sections["global_end"], "", env, out)
        return out

    def _expand(self, rules, prefix: str, env: dict, out: dict) -> None:
        for rule in rules:
            if isinstance(rule, tuple):  # an experts group: (when, rules)
                when, inner = rule
                if when is None or when(env):
                    for e in range(self.n_experts(env)):
                        for r in inner:
                            self._one(r, prefix, dict(env, e=e), out)
            else:
                self._one(rule, prefix, env, out)

    @staticmethod
    def _one(rule: TensorRule, prefix: str, env: dict, out: dict) -> None:
        if rule.when is not None and not rule.when(env):
            return
        name = prefix + rule.name.replace("{e}", str(env.get("e")))
        shape = tuple(s(env) for s in rule.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SourceError(f"config.json gives tensor {name} the shape {list(shape)} "
                              f"({', '.join(s.text for s in rule.shape)}), not non-negative integers")
        out[name] = (shape, rule.dtype, rule.optional)

    def is_fp8_release_linear(self, name: str) -> bool:
        """Does the FP8 release store this weight block-quantized?"""
        return name.endswith(".weight") and any(name[: -len(".weight")].endswith("." + m) or
                                                 name[: -len(".weight")] == m for m in self.fp8_release)

    def must_stay_high_precision(self, module: str) -> bool:
        """Modules SGLang loads unquantized whatever the checkpoint says (never MXFP8)."""
        return any(f".{m}." in f".{module}." for m in self.high_precision)

    def default_recipe(self) -> str:
        return self.recipes["mxfp8"]


def _config_int(config: dict, key: str, minimum: int, path, family: str, required: bool) -> None:
    value = config.get(key)
    if value is None and not required:
        return
    if value is None:
        raise SourceError(f"config.json lacks {key}, which a {family} model needs", file=path)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SourceError(f"{key} must be an integer >= {minimum}, got {value!r}", file=path)


def _families_dir():
    return yaml_data.builtin_dir("families")


def family_names() -> list[str]:
    return sorted(p.name[:-5] for p in _families_dir().iterdir() if p.name.endswith(".yaml"))


@functools.lru_cache(maxsize=None)
def load_family(name: str) -> Family:
    """The built-in family `name`, validated."""
    path = _families_dir() / f"{name}.yaml"
    if name not in family_names():
        raise SourceError(f"unknown model family {name!r}; supported: {', '.join(family_names())}")
    return parse_family(_raw(name, set()), str(path))


def all_families() -> list[Family]:
    """Every built-in family, validated (each parsed once per process)."""
    return [load_family(n) for n in family_names()]


def _raw(name: str, seen: set) -> dict:
    path = _families_dir() / f"{name}.yaml"
    try:
        data = yaml_data.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SourceError(f"cannot read family file: {e}", file=str(path)) from None
    if not isinstance(data, dict):
        raise SourceError("a family file must be a YAML mapping", file=str(path))
    base = data.get("extends")
    if base is not None:
        if base in seen or base not in family_names():
            raise SourceError(f"extends names an unknown or circular family {base!r}", file=str(path))
        merged = _raw(base, seen | {name})
        extra = data.get("tensors", {}).get("layer_extra") if isinstance(data.get("tensors"), dict) else None
        merged.update({k: v for k, v in data.items() if k not in ("extends", "tensors")})
        if extra:  # a derived family adds per-layer tensors to its base's
            merged["tensors"] = dict(merged["tensors"], layer=list(merged["tensors"]["layer"]) + list(extra))
        return merged
    return data


def parse_family(data: dict, where: str) -> Family:
    """A Family from its YAML form; every key and expression is checked."""
    def fail(msg: str):
        raise SourceError(msg, file=where)

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        fail(f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("name", "architectures", "model_types", "config", "tensors", "recipes", "experts", "moe_layer"):
        if key not in data:
            fail(f"a family needs `{key}`")
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v)  # noqa: E731
    for key in ("architectures", "model_types", "fp8_release", "high_precision", "mappings"):
        if not names(data.get(key, [])):
            fail(f"`{key}` must be a list of names")
    ints = lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
                                                 for x in v.values())
    if not ints(data["config"]) or not ints(data.get("optional_config", {})):
        fail("`config` and `optional_config` map config keys to their smallest valid value")
    recipes = data["recipes"]
    if not isinstance(recipes, dict) or "mxfp8" not in recipes or not names(list(recipes.values())):
        fail("`recipes` maps roles (mxfp8, the default, required; trtllm, bf16, ...) to built-in recipe names")
    checks = []
    for c in data.get("checks", []) or []:
        if not isinstance(c, dict) or set(c) != {"expr", "message"}:
            fail("each of `checks` is {expr: ..., message: ...}")
        checks.append((Expr(c["expr"], where), str(c["message"])))
    tensors = data["tensors"]
    if not isinstance(tensors, dict) or set(tensors) - set(_SECTIONS) - {"layer_extra"}:
        fail(f"`tensors` has sections {_SECTIONS}")
    sections = {s: tuple(_rules(tensors.get(s) or [], f"{where}: tensors.{s}", fail, top=True)) for s in _SECTIONS}
    fam = Family(
        name=str(data["name"]), description=str(data.get("description", "")),
        architectures=tuple(data["architectures"]), model_types=tuple(data["model_types"]),
        config=dict(data["config"]), optional_config=dict(data.get("optional_config") or {}),
        checks=tuple(checks), experts=str(data["experts"]),
        mtp_layers=Expr(data.get("mtp_layers", 0), where), moe_layer=Expr(data["moe_layer"], where),
        sections=sections, fp8_release=tuple(data.get("fp8_release", [])),
        high_precision=tuple(data.get("high_precision", [])), recipes=dict(recipes),
        mappings=tuple(data.get("mappings") or ["hf"]), logits=data.get("logits"),
        card_kept=str(data.get("card_kept", "")),
        demo_config=dict(data.get("demo_config") or {}), source=where)
    if fam.demo_config:
        fam.check_config(fam.demo_config, where)
    return fam


def _rules(items, where: str, fail, top: bool) -> list:
    out = []
    if not isinstance(items, list):
        fail(f"{where} must be a list")
    for i, item in enumerate(items, 1):
        label = f"{where} #{i}"
        if not isinstance(item, dict) or set(item) - _TENSOR_KEYS:
            fail(f"{label}: a tensor is {{name, shape, when?, dtype?, optional?}} or {{experts: [...], when?}}")
        when = Expr(item["when"], label) if "when" in item else None
        if "experts" in item:
            if not top or set(item) - {"experts", "when"}:
                fail(f"{label}: an experts group holds only `experts` and `when`, and does not nest")
            out.append((when, tuple(_rules(item["experts"], label, fail, top=False))))
            continue
        name, shape = item.get("name"), item.get("shape")
        if not isinstance(name, str) or not name or not isinstance(shape, list) or not shape:
            fail(f"{label}: needs a name and a non-empty shape list")
        dtype = item.get("dtype", "BF16")
        if dtype not in _DTYPES:
            fail(f"{label}: dtype must be one of {_DTYPES}")
        out.append(TensorRule(name, tuple(Expr(s, label) for s in shape), when, dtype, bool(item.get("optional"))))
    return out


def family_or_none(config: dict) -> Family | None:
    """The config's family, or None where it has none (for descriptions that must not fail)."""
    try:
        return family_of(config)
    except SourceError:
        return None


def family_of(config: dict, path: str | Path = "config.json") -> Family:
    """The family a config.json belongs to (by model_type, then architectures); unknown ones are
    refused with the list of supported families."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise SourceError(f"architectures must be a list of names, got {archs!r}", file=path)
    if not isinstance(model_type, (str, type(None))):
        raise SourceError(f"model_type must be a string, got {model_type!r}", file=path)
    families = all_families()
    for fam in families:  # model_type first: Kimi K2 says DeepseekV3ForCausalLM with model_type kimi_k2
        if model_type in fam.model_types:
            return fam
    for fam in families:
        if set(archs) & set(fam.architectures):
            return fam
    supported = "; ".join(f"{f.name} ({', '.join(f.architectures)})" for f in families)
    raise SourceError(f"unsupported architecture {archs or model_type!r}; mxconv converts these model "
                      f"families: {supported}", file=path)


def recipe_for(family: Family, recipe: str | None) -> str | None:
    """The built-in recipe to use: the family's default for None, its own for a role name
    (mxfp8, trtllm, bf16); a built-in recipe of another family is refused."""
    if recipe is None:
        return family.default_recipe()
    if recipe in family.recipes:
        return family.recipes[recipe]
    ours = set(family.recipes.values())
    families = list(map(load_family, family_names()))
    owners = sorted(f.name for f in families if recipe in f.recipes.values())
    if owners and recipe not in ours:
        raise RecipeError(f"recipe {recipe!r} is for {', '.join(owners)} models, this source is {family.name}; "
                          f"use {', '.join(sorted(ours))} or a recipe file")
    role_of = sorted(f.name for f in families if recipe in f.recipes)  # a role this family lacks
    if role_of:
        raise RecipeError(f"{family.name} has no {recipe!r} recipe (that role is {', '.join(role_of)}'s); its roles: "
                          f"{', '.join(sorted(family.recipes))}, or give a recipe file")
    return recipe
