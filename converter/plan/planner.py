"""Planning: decide, from names, shapes and dtypes alone, what happens to every source tensor and
where every output byte goes. Nothing here reads tensor data, so a 671B plan takes seconds and
every job is validated before the long run starts."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from converter.errors import NumericsError, SourceError
from converter.files import shard_name
from converter.numerics.reference import MX_BLOCK
from converter.plan.recipe import Recipe
from converter.plan.view import CanonicalTensor, CanonicalView
from converter.sources.checkpoint import SCALE_SUFFIX, SourceFormat
from converter.sources.safetensors import PlannedTensor, build_header

# Job actions
COPY = "copy"  # bytes unchanged
DEQUANT_BF16 = "dequant_bf16"  # FP8 block-scaled -> BF16 (DeepSeek's weight_dequant)
MXFP8 = "mxfp8"  # one linear -> MXFP8 weight + uint8 scale
TRTLLM_W13 = "trtllm_w13"  # routed expert gate + up -> FlashInfer TRT-LLM gemm1 operand
TRTLLM_W2 = "trtllm_w2"  # routed expert down -> FlashInfer TRT-LLM gemm2 operand
UNPACK_W13 = "unpack_w13"  # TRT-LLM gemm1 operand -> canonical gate + up (mxconv unshuffle)
UNPACK_W2 = "unpack_w2"  # TRT-LLM gemm2 operand -> canonical down

# How an operand becomes MXFP8, by source format
FROM_HIGH_PRECISION = "quantize"
FROM_FP8 = "dequant_quantize"
FROM_UE8M0 = "relayout"

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.(gate_proj|up_proj|down_proj)$")
_NUM_RE = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in _NUM_RE.split(name))


@dataclass(frozen=True)
class Operand:
    weight: str  # canonical name of the weight
    scale: str | None = None  # its FP8 block scale, when the source is FP8
    prep: str = FROM_HIGH_PRECISION  # how it becomes MXFP8 (for MXFP8 / TRT-LLM jobs)


@dataclass(frozen=True)
class Job:
    action: str
    operands: tuple[Operand, ...]
    outputs: tuple[PlannedTensor, ...]
    input_bytes: int
    sort_key: tuple  # the natural order of output names: the same bytes whatever the source's files

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(n for op in self.operands for n in (op.weight, op.scale) if n)


@dataclass
class ShardPlan:
    name: str
    jobs: list[Job]

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for j in self.jobs for t in j.outputs]

    @property
    def nbytes(self) -> int:
        return sum(j.output_bytes for j in self.jobs)

    @functools.cached_property
    def header(self) -> bytes:
        """The shard file's safetensors header, as the writer lays it out (built once)."""
        return build_header(self.tensors)[0]

    @property
    def file_size(self) -> int:
        return len(self.header) + self.nbytes


@dataclass
class ConversionPlan:
    source_format: SourceFormat
    recipe: Recipe
    shards: list[ShardPlan]
    modules_to_not_convert: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def jobs(self) -> list[Job]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.name for s in self.shards for t in s.tensors}


def is_linear_weight(name: str, t: CanonicalTensor) -> bool:
    return name.endswith(".weight") and len(t.shape) == 2 and "embed_tokens" not in name


def build_plan(view: CanonicalView, fmt: SourceFormat, recipe: Recipe, num_hidden_layers: int,
               max_shard_bytes: int) -> ConversionPlan:
    tensors = view.tensors
    prep = {SourceFormat.BF16: FROM_HIGH_PRECISION, SourceFormat.FP8: FROM_FP8,
            SourceFormat.FP8_UE8M0: FROM_UE8M0 if recipe.ue8m0_source == "relayout" else FROM_FP8}[fmt]
    jobs: list[Job] = []
    not_converted: list[str] = []
    experts: dict[str, dict[str, Operand]] = {}
    counts = {"mxfp8": 0, "dequantized_bf16": 0, "copied": 0}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors:
            continue  # consumed with its weight
        scale = name + SCALE_SUFFIX if name + SCALE_SUFFIX in tensors else None
        if t.dtype == "F8_E4M3" and scale is None:
            raise SourceError("float8 weight without a block scale", file=t.file, tensor=name)
        linear = is_linear_weight(name, t)
        module = name[: -len(".weight")] if linear else None
        if linear and recipe.wants_mxfp8(module, num_hidden_layers):
            if t.dtype not in ("F8_E4M3", "BF16", "F16", "F32"):
                raise SourceError(f"cannot quantize a {t.dtype} tensor", file=t.file, tensor=name)
            if t.shape[1] % MX_BLOCK:
                raise NumericsError(f"K={t.shape[1]} is not a multiple of {MX_BLOCK}; MXFP8 needs 1x32 blocks",
                                    file=t.file, tensor=name)
            op = Operand(name, scale, prep if scale else FROM_HIGH_PRECISION)
            counts["mxfp8"] += 1
            m = _EXPERT_RE.match(module)
            if recipe.moe_layout == "trtllm" and m:
                experts.setdefault(m.group(1), {})[m.group(2)] = op
                continue
            jobs.append(_job(MXFP8, (op,), mxfp8_outputs(module, t.shape, recipe.scale_name), tensors))
            continue
        if linear:
            not_converted.append(module)
        if scale:
            counts["dequantized_bf16"] += 1
            jobs.append(_job(DEQUANT_BF16, (Operand(name, scale),), (PlannedTensor(name, "BF16", t.shape),), tensors))
        else:
            counts["copied"] += 1
            jobs.append(_job(COPY, (Operand(name),), (PlannedTensor(name, t.dtype, t.shape),), tensors))
    jobs.extend(_trtllm_jobs(experts, tensors))
    jobs.sort(key=lambda j: j.sort_key)
    return ConversionPlan(fmt, recipe, pack_shards(jobs, max_shard_bytes),
                          sorted(set(not_converted), key=natural_key), counts)


def mxfp8_outputs(module: str, shape: tuple[int, ...], scale_name: str = "weight_scale_inv"
                  ) -> tuple[PlannedTensor, ...]:
    """The two tensors of one MXFP8 linear: e4m3 weight [N, K] and uint8 scale [N, K/32]
    (named `module.weight_scale_inv`, or the recipe's scale_name)."""
    n, k = shape
    return (PlannedTensor(f"{module}.weight", "F8_E4M3", (n, k)),
            PlannedTensor(f"{module}.{scale_name}", "U8", (n, k // MX_BLOCK)))


def _job(action: str, operands: tuple[Operand, ...], outputs: tuple[PlannedTensor, ...],
         tensors: dict[str, CanonicalTensor]) -> Job:
    in_bytes = sum(tensors[n].nbytes for op in operands for n in (op.weight, op.scale) if n)
    return Job(action, operands, outputs, in_bytes, natural_key(outputs[0].name))


def _trtllm_jobs(experts: dict[str, dict[str, Operand]], tensors: dict[str, CanonicalTensor]) -> list[Job]:
    jobs = []
    for prefix, ops in experts.items():
        missing = {"gate_proj", "up_proj", "down_proj"} - set(ops)
        if missing:
            t = tensors[next(iter(ops.values())).weight]
            raise SourceError(f"expert {prefix} lacks {sorted(missing)} (all of gate/up/down are needed "
                              "for the TRT-LLM layout)", file=t.file, tensor=t.name)
        gate, up, down = (tensors[ops[k].weight] for k in ("gate_proj", "up_proj", "down_proj"))
        if gate.shape != up.shape or down.shape != (gate.shape[1], gate.shape[0]):
            raise SourceError(f"expert shapes gate {gate.shape}, up {up.shape}, down {down.shape} do not fit "
                              "a gated MLP", file=gate.file, tensor=gate.name)
        i, h = gate.shape
        if h % 128 or i % 128:
            raise NumericsError(f"TRT-LLM layout needs hidden and intermediate sizes divisible by 128, "
                                f"got H={h}, I={i}", file=gate.file, tensor=gate.name)
        w13 = (PlannedTensor(f"{prefix}.w13_weight", "F8_E4M3", (2 * i, h)),
               PlannedTensor(f"{prefix}.w13_weight_scale_inv", "U8", (2 * i, h // MX_BLOCK)))
        w2 = (PlannedTensor(f"{prefix}.w2_weight", "F8_E4M3", (h, i)),
              PlannedTensor(f"{prefix}.w2_weight_scale_inv", "U8", (h, i // MX_BLOCK)))
        jobs.append(_job(TRTLLM_W13, (ops["gate_proj"], ops["up_proj"]), w13, tensors))
        jobs.append(_job(TRTLLM_W2, (ops["down_proj"],), w2, tensors))
    return jobs


def pack_shards(jobs: list[Job], max_bytes: int) -> list[ShardPlan]:
    """Greedy packing in the jobs' order; a job's outputs never straddle two shards."""
    groups: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.output_bytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.output_bytes
    groups = [g for g in groups if g]
    return [ShardPlan(shard_name(i + 1, len(groups)), g) for i, g in enumerate(groups)]
