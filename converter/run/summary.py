"""Human-readable text for plans and results (the CLI prints these; a Python user can too)."""

from __future__ import annotations

import re

from converter.plan.planner import COPY, DEQUANT_BF16, ConversionPlan
from converter.run.consumers import consumer_keys, who_loads
from converter.run.pipeline import ConversionResult
from converter.sources.checkpoint import SourceCheckpoint
from converter.units import format_size


_LISTED = 8  # files listed one by one; more are shown as the first and last few


def _listing(rows: list[str], total: str) -> list[str]:
    """`rows` (one per file) as they are, or the first and last few and a line for the rest."""
    if len(rows) <= _LISTED:
        return rows
    return rows[:3] + [f"  ... {len(rows) - 5} more ({total} in all)"] + rows[-2:]


def _job_table(plan: ConversionPlan) -> list[str]:
    """What happens to the tensors, one line per name pattern (layer and expert numbers as #) with
    its count and layers: a few dozen lines for a whole DeepSeek V3, not 90,000."""
    groups: dict[tuple[str, str], list] = {}
    for shard in plan.shards:
        for job in shard.jobs:
            what = {COPY: "copy", DEQUANT_BF16: "dequantize to BF16"}.get(job.action, job.action)
            names = [_NUMBER.sub("#", t.name) for t in job.outputs]
            pattern = names[0] + (f" (+ {', '.join(n.rsplit('.', 1)[-1] for n in names[1:])})" if names[1:] else "")
            first = _NUMBER.search(job.outputs[0].name)
            group = groups.setdefault((what, pattern), [0, set()])
            group[0] += 1
            if first and ".layers." in job.outputs[0].name:
                group[1].add(int(first.group()))
    lines = []
    for (what, pattern), (count, layers) in groups.items():
        if len(layers) > 1:
            gaps = len(layers) < max(layers) - min(layers) + 1
            span = f"  ({len(layers) if gaps else 'layers'} {'layers in ' if gaps else ''}{min(layers)}-{max(layers)})"
        else:
            span = "".join(f"  (layer {n})" for n in layers)
        lines.append(f"    {what:<20} {count:>6} x {pattern}{span}")
    return lines


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")  # a layer or expert number inside a tensor name


def describe_plan(ckpt: SourceCheckpoint, plan: ConversionPlan, mapping: str, verbose: bool = False) -> str:
    lines = [f"source: {ckpt.root} ({plan.source_format.value}, mapping {mapping}, "
             f"{len(ckpt.files)} shard(s), {format_size(ckpt.total_bytes)})"]
    counts: dict = {}
    for info in ckpt.tensors.values():  # a DCP tensor counts in every file holding one of its chunks
        for file in info.files:
            counts[file] = counts.get(file, 0) + 1
    lines += _listing([f"  {path.name}: {counts.get(path, 0)} tensors, {format_size(path.stat().st_size)}"
                       for path in ckpt.files], format_size(ckpt.total_bytes))
    r = plan.recipe
    lines.append(f"recipe: {r.name} (target {r.target}, scale rule {r.scale_rule}, MoE layout {r.moe_layout}"
                 + (f", UE8M0 sources: {r.ue8m0_source}" if plan.source_format.value == "fp8_ue8m0" else "") + ")")
    c = plan.counts
    lines.append(f"tensors: {c.get('mxfp8', 0)} quantized to MXFP8, {c.get('dequantized_bf16', 0)} dequantized "
                 f"to BF16, {c.get('copied', 0)} copied unchanged")
    if plan.modules_to_not_convert:
        shown = ", ".join(plan.modules_to_not_convert[:4])
        more = len(plan.modules_to_not_convert) - 4
        lines.append(f"linear modules kept in high precision ({len(plan.modules_to_not_convert)}): {shown}"
                     + (f", ... (+{more})" if more > 0 else ""))
    lines.append(f"loads in: {who_loads(_quantization(plan))}")
    lines.append(f"output: {len(plan.shards)} shard(s), {format_size(plan.total_size)}")
    lines += _listing([f"  {shard.name}: {len(shard.tensors)} tensors, {format_size(shard.nbytes)}"
                       for shard in plan.shards], format_size(plan.total_size))
    if verbose:
        lines.append("jobs (# stands for a layer or expert number):")
        lines += _job_table(plan)
    return "\n".join(lines)


def describe_result(result: ConversionResult) -> str:
    plan = result.plan
    notes = "".join(f"\n  {note}" for note in result.source_notes)
    if result.already_complete:
        return f"{result.dst}: already complete, nothing to do (same source, recipe and options)" + notes
    converted = plan.input_bytes if result.input_converted is None else result.input_converted
    rate = format_size(converted / result.seconds) + "/s" if result.seconds else "-"
    resumed = (f", resumed ({result.skipped_shards} shard(s) already done, {format_size(converted)} of input "
               "converted now)") if result.skipped_shards else ""
    if result.processes > 1:
        resumed += f", in {result.processes} processes"
    if result.cluster:
        c = result.cluster
        moved = f", {c['moved']} moved off {len(c['lost_nodes'])} lost node(s)" if c["lost_nodes"] else ""
        resumed += f", on {c['ran_on']} Ray node(s) ({c['tasks']} task(s){moved})"
    c = plan.counts
    kept = (f"{len(plan.modules_to_not_convert)} linear modules kept in BF16 (modules_to_not_convert)"
            if plan.recipe.target == "mxfp8" else "plain BF16 checkpoint, no quantization_config")
    return (f"wrote {result.dst}: {len(plan.shards)} shard(s), {format_size(plan.total_size)} "
            f"in {result.seconds:.2f} s ({rate} of input){resumed}\n"
            f"  {c.get('mxfp8', 0)} MXFP8, {c.get('dequantized_bf16', 0)} dequantized to BF16, "
            f"{c.get('copied', 0)} copied; " + kept + f"; {len(result.copied_files)} other file(s) copied\n"
            f"  loads in: {who_loads(_quantization(plan))}" + notes)


def _quantization(plan: ConversionPlan) -> dict | None:
    """What decides who loads the output, as its quantization_config will say it."""
    if plan.recipe.target != "mxfp8":
        return None
    return {"quant_method": "mxfp8", "moe_weight_layout": plan.recipe.moe_layout == "trtllm",
            **consumer_keys([], plan.recipe.scale_name)}
