"""Structural checks of `mxconv verify`, from headers, index and config alone (no tensor data):
reading the destination leniently, coverage (plan outputs vs DST tensors, index vs shards,
total_size, header sanity) and config (`quantization_config` vs the tensors).

A problem found here is a `Failure` (check, tensor, file, message), never an exception: the
point of verify is to list everything wrong with a destination, not to stop at the first thing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import SourceError
from converter.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from converter.numerics.reference import MX_BLOCK
from converter.plan.planner import ConversionPlan, natural_key
from converter.plan.view import CanonicalView
from converter.run.consumers import LAYER_AGNOSTIC_SKIPS, consumer_keys
from converter.sources.checkpoint import SCALE_SUFFIX, SourceCheckpoint
from converter.sources.safetensors import DTYPES, ITEMSIZE, TensorInfo, read_header

COVERAGE, CONFIG, BYTES, NUMERICS, LOGITS = "coverage", "config", "bytes", "numerics", "logits"
CHECKS = (COVERAGE, CONFIG, BYTES, NUMERICS, LOGITS)

HIGH_PRECISION_DTYPES = ("BF16", "F16", "F32")
# The `__metadata__["format"]` values transformers accepts when it loads a safetensors file.
_KNOWN_FORMATS = ("pt", "tf", "flax", "mlx")
EXPECTED_QUANT_CONFIG = {"quant_method": "mxfp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [1, MX_BLOCK], "scale_fmt": "ue8m0"}


@dataclass
class Failure:
    check: str
    tensor: str | None
    message: str
    file: str | None = None

    def describe(self) -> str:
        where = f"{self.tensor}: " if self.tensor else (f"{Path(self.file).name}: " if self.file else "")
        return f"[{self.check}] {where}{self.message}"

    def to_dict(self) -> dict:
        return {"check": self.check, "tensor": self.tensor, "file": self.file, "message": self.message}


@dataclass
class Destination:
    """What DST holds, as far as its index, headers and config say. `tensors` has only those
    whose bytes lie inside their file; `unreadable` names the others."""

    root: Path
    config: dict | None
    weight_map: dict[str, str] | None
    index_total_size: int | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    unreadable: set[str] = field(default_factory=set)


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(data, None) or (None, why it could not be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({e})"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return data, None


def read_destination(root: Path, failures: list[Failure]) -> Destination:
    """Index, shard headers and config of DST; every inconsistency becomes a coverage failure."""
    def fail(message, tensor=None, file=None, check=COVERAGE):
        failures.append(Failure(check, tensor, message, str(file) if file else None))

    config, why = read_json(root / CONFIG_FILE)
    if config is None:
        fail(f"{CONFIG_FILE} is {why}", file=root / CONFIG_FILE, check=CONFIG)
    dest = Destination(root, config, None, None)
    index, why = read_json(root / INDEX_FILE)
    on_disk = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    if index is not None:
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            fail("index has no valid weight_map", file=root / INDEX_FILE)
            wm = {}
        dest.weight_map = wm
        total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        dest.index_total_size = total if isinstance(total, int) and not isinstance(total, bool) else None
        if dest.index_total_size is None:
            fail("index metadata has no integer total_size", file=root / INDEX_FILE)
        names = set()
        for tensor, fname in wm.items():
            if Path(fname).is_absolute() or ".." in Path(fname).parts or "/" in fname:
                fail(f"index maps it to {fname!r}, outside the checkpoint directory", tensor, root / INDEX_FILE)
            elif fname not in on_disk:
                fail(f"index maps it to {fname}, which does not exist", tensor, root / fname)
            else:
                names.add(fname)
        for fname in on_disk:
            if fname not in names:
                fail("shard file is not named by the index (stray or leftover file)", file=root / fname)
        files = sorted(names | set(on_disk))
    elif why != "missing":
        fail(f"{INDEX_FILE} is {why}", file=root / INDEX_FILE)
        files = on_disk
    elif SINGLE_FILE in on_disk:
        files = on_disk
        for fname in on_disk:
            if fname != SINGLE_FILE:
                fail(f"shard file next to {SINGLE_FILE} without an index", file=root / fname)
    else:
        fail(f"no {INDEX_FILE} and no {SINGLE_FILE}: nothing to verify", file=root)
        files = on_disk
    for fname in files:
        path = root / fname
        dest.files.append(path)
        for info in _read_shard(path, fail):
            first = dest.tensors.get(info.name)
            if first is not None or info.name in dest.unreadable:
                fail(f"stored twice (also in {first.file.name if first else 'an earlier shard'})", info.name, path)
            elif info.end > path.stat().st_size:
                dest.unreadable.add(info.name)
            else:
                dest.tensors[info.name] = info
    _check_index_agrees(dest, fail)
    return dest


def _read_shard(path: Path, fail) -> list[TensorInfo]:
    """Tensors of one shard. A file the strict reader rejects is reported, then read leniently so
    that tensors before a truncation are still verified."""
    try:
        infos, metadata = read_header(path)
    except SourceError as e:
        fail(e.message, e.tensor, path)
        return _lenient_header(path, fail, reported=e.tensor)
    if metadata.get("format") not in _KNOWN_FORMATS:
        fail(f"__metadata__ format is {metadata.get('format')!r}, transformers expects one of {_KNOWN_FORMATS}",
             file=path)
    _check_contiguous(path, list(infos.values()), fail)
    return list(infos.values())


def _lenient_header(path: Path, fail, reported: str | None) -> list[TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        return []
    out = []
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        try:
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            start, end = (8 + n + int(o) for o in offsets)
        except (TypeError, KeyError, ValueError):
            continue
        if dtype not in DTYPES or end - start != nbytes:
            continue
        info = TensorInfo(name, path, dtype, tuple(shape), start, end)
        if end > size and name != reported:
            fail(f"truncated: its data ends at byte {end} but the file has {size} bytes", name, path)
        out.append(info)
    return out


def _check_contiguous(path: Path, infos: list[TensorInfo], fail) -> None:
    """The safetensors library rejects files whose data section has holes or trailing bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    pos = data_start
    for info in sorted(infos, key=lambda i: i.start):
        if info.start != pos:
            fail(f"data starts at byte {info.start}, the previous tensor ends at {pos} (hole in the data)",
                 info.name, path)
        pos = max(pos, info.end)
    if pos != size:
        fail(f"{size - pos} bytes after the last tensor (the safetensors library rejects such files)", file=path)


def _check_index_agrees(dest: Destination, fail) -> None:
    held = {**{n: i.file.name for n, i in dest.tensors.items()},
            **{n: "?" for n in dest.unreadable}}
    if dest.weight_map is not None:
        for name, fname in dest.weight_map.items():
            if name not in held and (dest.root / fname).exists():
                fail(f"index maps it to {fname}, but no shard holds it", name, dest.root / fname)
        for name, info in dest.tensors.items():
            if name not in dest.weight_map:
                fail("stored in a shard but missing from the index", name, info.file)
            elif dest.weight_map[name] != info.file.name:
                fail(f"stored in {info.file.name} but the index says {dest.weight_map[name]}", name, info.file)
    if dest.index_total_size is not None:
        actual = sum(i.nbytes for i in dest.tensors.values())
        if dest.unreadable:
            return  # the shortfall is already reported tensor by tensor
        if actual != dest.index_total_size:
            fail(f"index total_size is {dest.index_total_size} but the tensors hold {actual} bytes",
                 file=dest.root / INDEX_FILE)


# ----------------------------------------------------------------------------- coverage


def check_coverage(plan: ConversionPlan, view: CanonicalView, src: SourceCheckpoint, dest: Destination,
                   failures: list[Failure]) -> dict:
    """Plan outputs vs DST tensors; every source tensor used or deliberately dropped. Returns counts."""
    planned = {t.name: (t, job) for job in plan.jobs for t in job.outputs}
    for name in sorted(set(planned) - set(dest.tensors) - dest.unreadable, key=natural_key):
        t, job = planned[name]
        failures.append(Failure(COVERAGE, name, f"missing: expected {t.dtype} {list(t.shape)} from "
                                                f"{job.operands[0].weight} ({job.action})"))
    for name in sorted(set(dest.tensors) - set(planned), key=natural_key):
        info = dest.tensors[name]
        failures.append(Failure(COVERAGE, name, f"unexpected: no source tensor produces it under recipe "
                                                f"{plan.recipe.name}", str(info.file)))
    for name, info in dest.tensors.items():
        if name in planned:
            t = planned[name][0]
            if (info.dtype, info.shape) != (t.dtype, t.shape):
                failures.append(Failure(COVERAGE, name, f"stored as {info.dtype} {list(info.shape)}, expected "
                                                        f"{t.dtype} {list(t.shape)}", str(info.file)))
    used_canonical = {n for job in plan.jobs for n in job.inputs}
    for name in sorted(set(view.tensors) - used_canonical, key=natural_key):
        failures.append(Failure(COVERAGE, name, "source tensor is not used by any output tensor"))
    if view.derivations is None:
        used_source = used_canonical
    else:
        used_source = {s for n in used_canonical for s in view.derivations[n].sources}
    dropped = sorted(set(src.tensors) - used_source, key=natural_key)
    return {"source_tensors": len(src.tensors), "planned_outputs": len(planned), "dst_tensors": len(dest.tensors),
            "quantized": plan.counts.get("mxfp8", 0), "dequantized_bf16": plan.counts.get("dequantized_bf16", 0),
            "kept": plan.counts.get("copied", 0), "dropped_by_mapping": dropped}


# ------------------------------------------------------------------------------- config


def module_listed(module: str, entries: list[str]) -> bool:
    """SGLang's rule (0.5.23 `_module_path_match`): an entry names the module, one of its parents,
    or a run of its path components anywhere (`self_attn.kv_b_proj` matches every layer's)."""
    return any(module == e or module.startswith(e + ".") or f".{e}." in f".{module}." for e in entries)


def _module_of(name: str) -> str | None:
    for suffix in (".weight", "_weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)].rstrip(".")
    return None


def check_config(plan: ConversionPlan, src: SourceCheckpoint, dest: Destination, failures: list[Failure]) -> None:
    """`quantization_config` against the tensors DST really holds, and the rest against the source."""
    def fail(message, tensor=None):
        failures.append(Failure(CONFIG, tensor, message, str(dest.root / CONFIG_FILE) if tensor is None else None))

    config = dest.config
    if config is None:
        return  # reported by read_destination
    family = src.family
    for key in sorted((set(src.config) | set(config)) - {"quantization_config"}):
        if src.config.get(key) != config.get(key):
            fail(f"config key {key!r} is {config.get(key)!r}, the source has {src.config.get(key)!r}")
    tensors = dest.tensors
    quantized = {n: i for n, i in tensors.items() if i.dtype == "F8_E4M3"}
    qc = config.get("quantization_config")
    if plan.recipe.target != "mxfp8":
        if qc is not None:
            fail(f"quantization_config present, but recipe {plan.recipe.name} targets {plan.recipe.target}")
        return  # float8 tensors, if any, are reported by coverage (dtype differs from the plan)
    if not isinstance(qc, dict):
        fail("no quantization_config, but the checkpoint holds float8 weights" if quantized
             else "no quantization_config (recipe target is mxfp8)")
        qc = {}
    for key, want in EXPECTED_QUANT_CONFIG.items():
        if qc:
            got = qc.get(key)
            if (list(got) if isinstance(got, (list, tuple)) else got) != want:
                fail(f"quantization_config.{key} is {got!r}, expected {want!r}")
    skip = qc.get("modules_to_not_convert", [])
    if not isinstance(skip, list) or not all(isinstance(e, str) for e in skip):
        fail("quantization_config.modules_to_not_convert must be a list of module names")
        skip = []
    for name, info in tensors.items():
        module = _module_of(name)
        if module is None:
            continue
        if info.dtype == "F8_E4M3":
            _check_scale_pair(name, info, tensors, failures, scale_suffix(plan))
            if module_listed(module, skip):
                failures.append(Failure(CONFIG, name, "MXFP8 weight whose module is in modules_to_not_convert: "
                                                      "SGLang would load its e4m3 bytes as BF16"))
            if family is not None and family.must_stay_high_precision(module):
                # SGLang builds these without a quant_config, whatever the recipe says (SPEC 1 and 2)
                failures.append(Failure(CONFIG, name, f"quantized, but this module must stay BF16: SGLang loads it "
                                                      f"unquantized in a {family.name} model "
                                                      f"({', '.join(family.high_precision)})"))
        elif (info.dtype in HIGH_PRECISION_DTYPES and len(info.shape) == 2 and name.endswith(".weight")
              and "embed_tokens" not in name and not module_listed(module, skip)):
            failures.append(Failure(CONFIG, name, f"{info.dtype} linear weight not in modules_to_not_convert: "
                                                  "SGLang would expect MXFP8 for it"))
    linear_modules = [_module_of(n) for n, i in tensors.items() if i.dtype in HIGH_PRECISION_DTYPES
                      and len(i.shape) == 2 and n.endswith(".weight")]
    for generic in LAYER_AGNOSTIC_SKIPS:
        if generic not in skip and any(m and m.endswith("." + generic) for m in linear_modules):
            fail(f"modules_to_not_convert lacks the layer-agnostic entry {generic!r}: SGLang's MTP draft "
                 f"model (DeepseekV3ForCausalLMNextN) skips only model.layers.61's {generic}, and casts the "
                 "BF16 weight of an MTP layer at any other index into MXFP8")
    for entry in skip:
        if not any(module_listed(m, [entry]) for m in linear_modules if m):
            fail(f"modules_to_not_convert entry {entry!r} matches no high-precision weight")
    suffix = scale_suffix(plan)
    for name, info in tensors.items():
        if info.dtype == "U8" and name.endswith(suffix):
            weight = tensors.get(name[: -len(suffix)])
            if weight is None or weight.dtype != "F8_E4M3":
                failures.append(Failure(CONFIG, name, "uint8 scale without a float8_e4m3 weight"))
    for key, want in consumer_keys(skip, plan.recipe.scale_name).items():
        if key in ("ignored_layers", "ignore") and key in qc and qc[key] != skip:
            fail(f"quantization_config.{key} differs from modules_to_not_convert (SGLang reads ignored_layers "
                 "first, vLLM ignore): the consumers would skip different modules")
        elif qc and qc.get(key) != want:
            fail(f"quantization_config.{key} is {qc.get(key)!r}, expected {want!r}")
    _check_moe_layout(plan, qc, tensors, fail)


def scale_suffix(plan: ConversionPlan) -> str:
    """What an MXFP8 weight's name gains to name its scale: `_scale_inv`, or `_scale` (vLLM's)."""
    return plan.recipe.scale_name.removeprefix("weight")


def _check_scale_pair(name: str, info: TensorInfo, tensors: dict[str, TensorInfo], failures: list[Failure],
                      suffix: str = SCALE_SUFFIX) -> None:
    scale = tensors.get(name + suffix)
    if scale is None:
        failures.append(Failure(CONFIG, name, f"float8 weight without {name + suffix}"))
        return
    want = (*info.shape[:-1], info.shape[-1] // MX_BLOCK) if info.shape and info.shape[-1] % MX_BLOCK == 0 else None
    if scale.dtype != "U8":
        failures.append(Failure(CONFIG, scale.name, f"MXFP8 scale stored as {scale.dtype}; SGLang copies "
                                                     "scales into a uint8 parameter, so it must be U8"))
    elif want is None or scale.shape != want:
        failures.append(Failure(CONFIG, scale.name, f"scale shape {list(scale.shape)} does not fit 1x{MX_BLOCK} "
                                                     f"blocks of weight {list(info.shape)}"))


def _check_moe_layout(plan: ConversionPlan, qc: dict, tensors: dict[str, TensorInfo], fail) -> None:
    packed = sorted((n for n in tensors if n.endswith((".w13_weight", ".w2_weight"))), key=natural_key)
    layout = qc.get("moe_weight_layout")
    if packed or plan.recipe.moe_layout == "trtllm":
        from converter.numerics.trtllm_layout import LAYOUT_METADATA

        if layout is None:
            fail(f"experts are stored pre-shuffled ({packed[0] if packed else 'recipe moe_layout trtllm'}) but "
                 "quantization_config has no moe_weight_layout")
        elif layout != LAYOUT_METADATA:
            keys = sorted(k for k in set(layout) | set(LAYOUT_METADATA) if layout.get(k) != LAYOUT_METADATA.get(k)) \
                if isinstance(layout, dict) else ["(not an object)"]
            fail(f"quantization_config.moe_weight_layout differs from the trtllm-gen layout in {keys}")
    elif layout is not None:
        fail("quantization_config.moe_weight_layout is set, but the experts are in canonical layout")


def source_sizes_changed(prov: dict, src: SourceCheckpoint) -> list[tuple[str, str]]:
    """(file, why) for each source shard that differs in name or size from the one converted."""
    recorded = ((prov.get("source") or {}).get("shards") or {}) if isinstance(prov, dict) else {}
    if not isinstance(recorded, dict) or not recorded:
        return []
    out = []
    now = {p.name: p.stat().st_size for p in src.files}
    for name, entry in recorded.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if name not in now:
            out.append((name, "was converted but is not in the source now"))
        elif size is not None and size != now[name]:
            out.append((name, f"has {now[name]} bytes, the conversion read {size}"))
    for name in sorted(set(now) - set(recorded)):
        out.append((name, "is in the source but was not converted"))
    return out
