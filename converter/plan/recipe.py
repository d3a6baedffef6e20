"""Conversion recipes: YAML files under configs/ (or a user path), validated when loaded."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from converter import yaml_data
from converter.errors import RecipeError
from converter.numerics.reference import ScaleRule, ScaleZeroBlocks

TARGETS = ("mxfp8", "bf16")
UE8M0_MODES = ("relayout", "requantize")
MOE_LAYOUTS = ("canonical", "trtllm")
# MXFP8 scale tensor name: SGLang and transformers read `weight_scale_inv`; vLLM's mxfp8 method
# (ModelOptMxFp8Config) reads `weight_scale`, which SGLang also loads (it renames it) and
# transformers 5.x does not.
SCALE_NAMES = ("weight_scale_inv", "weight_scale")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str = "mxfp8"
    scale_rule: str = ScaleRule.RCEIL.value
    ue8m0_source: str = "relayout"
    moe_layout: str = "canonical"
    quantize: tuple[str, ...] = ()
    keep_bf16: tuple[str, ...] = ()
    keep_first_layers: int = 0
    keep_last_layers: int = 0
    allow_nonfinite: bool = False
    scale_zero_blocks: str = ScaleZeroBlocks.EXACT.value  # TransformerEngine >= 2.13; "flush": TE <= 2.12
    scale_name: str = "weight_scale_inv"
    source: str = field(default="", compare=False)  # where it was loaded from (not part of its identity)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        if d["scale_zero_blocks"] == ScaleZeroBlocks.EXACT.value:
            # absent when default: manifests and mxconv.json files from before the key keep their identity
            d.pop("scale_zero_blocks")
        d["quantize"], d["keep_bf16"] = list(self.quantize), list(self.keep_bf16)
        return d

    def with_options(self, **overrides) -> "Recipe":
        """The recipe with command-line overrides applied (None means: keep the recipe's value)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        try:
            return _validated(dataclasses.replace(self, **changes), self.source)
        except RecipeError as e:  # a bad value given on the command line: name the flag, not the recipe file
            flag = next((k for k in changes if k in _FLAGS and e.message.startswith(k + " ")), None)
            if flag is None:
                raise
            raise RecipeError(f"--{flag.replace('_', '-')}: {e.message.removeprefix(flag + ' ')}") from None

    def wants_mxfp8(self, module: str, num_hidden_layers: int) -> bool:
        """Is the linear `module` (name without .weight) quantized to MXFP8 by this recipe?"""
        if self.target != "mxfp8" or not _matches(module, self.quantize) or _matches(module, self.keep_bf16):
            return False
        m = _LAYER_RE.match(module)
        if m:
            layer = int(m.group(1))
            if layer < self.keep_first_layers:
                return False
            if num_hidden_layers - self.keep_last_layers <= layer < num_hidden_layers:
                return False
        return True


_FLAGS = ("scale_rule", "scale_zero_blocks")  # recipe keys `mxconv convert` sets from a flag of the same name


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """fnmatchcase against any of the patterns, as one regular expression (a DeepSeek V3 plan asks
    this of 92,000 tensors: one fnmatch per pattern made planning 0.3 s slower, 3.5 s in all)."""
    either = _either(patterns)
    return either is not None and either.match(name) is not None


@functools.lru_cache(maxsize=256)
def _either(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)) if patterns else None


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in yaml_data.builtin_dir("configs").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (e.g. "deepseek_v3_mxfp8") or a YAML file by path."""
    text, where = _recipe_text(str(name_or_path))
    try:
        data = yaml_data.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {e}", file=where) from e
    if isinstance(data, dict) and "extends" in data:
        # a recipe may start from another one and override some keys
        data = dict(data)
        base = data.pop("extends")
        if not isinstance(base, str) or Path(str(base)).name == Path(where).name.split(" ")[0]:
            raise RecipeError(f"extends must name another recipe, got {base!r}", file=where)
        data = load_recipe(base).to_dict() | data
    return recipe_from_dict(data, where)


def recipe_from_dict(data: object, where: str = "recipe") -> Recipe:
    """A recipe from its dict form (a parsed YAML file, or `Recipe.to_dict()` from a provenance file)."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", file=where)
    known = {f.name for f in dataclasses.fields(Recipe)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}; valid keys: {sorted(known)}", file=where)
    data = dict(data)
    if "name" not in data:
        data["name"] = Path(where).stem
    for key in ("quantize", "keep_bf16"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise RecipeError(f"{key} must be a list of module name patterns", file=where)
        data[key] = tuple(value)
    return _validated(Recipe(**data, source=where), where)


def _recipe_text(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            return path.read_text(), str(path)
        except OSError as e:
            raise RecipeError(f"cannot read recipe: {e.strerror}", file=path) from e
    builtin = yaml_data.builtin_dir("configs") / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise RecipeError(f"no built-in recipe {name_or_path!r}; give a role of the source's family (mxfp8, trtllm, "
                          f"bf16, ...), a built-in recipe ({', '.join(builtin_recipes())}) or a path to a YAML file")
    return builtin.read_text(), f"{name_or_path} (built-in)"


def _validated(r: Recipe, where: str) -> Recipe:
    def bad(msg: str) -> RecipeError:
        return RecipeError(msg, file=where)

    if not isinstance(r.name, str) or not r.name:
        raise bad("name must be a non-empty string")
    if r.target not in TARGETS:
        raise bad(f"target must be one of {TARGETS}, got {r.target!r}")
    if r.scale_rule not in [s.value for s in ScaleRule]:
        raise bad(f"scale_rule must be 'rceil' or 'floor', got {r.scale_rule!r}")
    if r.scale_zero_blocks not in [z.value for z in ScaleZeroBlocks]:
        raise bad(f"scale_zero_blocks must be 'exact' (TransformerEngine >= 2.13) or 'flush' (TransformerEngine "
                  f"<= 2.12, torchao 0.18), got {r.scale_zero_blocks!r}")
    if r.ue8m0_source not in UE8M0_MODES:
        raise bad(f"ue8m0_source must be one of {UE8M0_MODES}, got {r.ue8m0_source!r}")
    if r.moe_layout not in MOE_LAYOUTS:
        raise bad(f"moe_layout must be one of {MOE_LAYOUTS}, got {r.moe_layout!r}")
    if r.moe_layout == "trtllm" and r.target != "mxfp8":
        raise bad("moe_layout trtllm needs target mxfp8")
    if r.scale_name not in SCALE_NAMES:
        raise bad(f"scale_name must be one of {SCALE_NAMES}, got {r.scale_name!r}")
    if r.scale_name != "weight_scale_inv" and r.moe_layout == "trtllm":
        raise bad("moe_layout trtllm keeps scale_name weight_scale_inv (its own loader's names)")
    for key in ("keep_first_layers", "keep_last_layers"):
        v = getattr(r, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"{key} must be a non-negative integer, got {v!r}")
    if not isinstance(r.allow_nonfinite, bool):
        raise bad(f"allow_nonfinite must be true or false, got {r.allow_nonfinite!r}")
    if r.target == "mxfp8" and not r.quantize:
        raise bad("target mxfp8 needs at least one quantize pattern")
    return r
