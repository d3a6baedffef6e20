"""`convert()`: read -> map names -> plan -> validate -> execute -> write index, config, provenance.

Shards are written atomically; the index, config and provenance (the completion marker) come
last, so an interrupted run never looks complete, and rerunning the same call resumes it.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from converter.errors import Interrupted, MappingError, MxconvError, SourceError, interrupted_as
from converter.models.family import Family, recipe_for
from converter.plan.planner import ConversionPlan, build_plan
from converter.plan.recipe import Recipe, load_recipe
from converter.plan.view import CanonicalView
from converter.run.devices import resolve_devices
from converter.run.freshness import changed_during_run, plan_fingerprint
from converter.run.output import copy_side_files, prepare_destination, record_manifest
from converter.run.provenance import output_config, write_index_and_config, write_provenance
from converter.run.preflight import check_source_tensors, preflight_destination
from converter.run.processes import process_count
from converter.run.processes import write as write_shards
from converter.sources.checkpoint import SourceCheckpoint
from converter.sources.hashing import SourceHasher
from converter.sources.hub_digests import recorded_sha256s
from converter.units import parse_size

DEFAULT_RECIPE = "deepseek_v3_mxfp8"  # when no family is known; otherwise the family's `recipes.mxfp8`


@dataclass
class ConversionResult:
    dst: Path
    source: SourceCheckpoint
    plan: ConversionPlan
    mapping: str
    seconds: float = 0.0
    skipped_shards: int = 0
    input_converted: int | None = None  # source bytes this run converted (less than the plan's when resumed)
    already_complete: bool = False
    dry_run: bool = False
    copied_files: list[str] = field(default_factory=list)
    source_notes: list[str] = field(default_factory=list)  # source files found changed, or unchanged by sha256
    cluster: dict | None = None  # --ray: nodes, tasks, tasks moved off lost nodes
    processes: int = 1  # conversion processes that wrote the shards on this machine (run/processes.py)


def open_source(src: str | Path, mapping: str = "auto", config: str | Path | None = None
                ) -> tuple[SourceCheckpoint, CanonicalView, str]:
    """The source checkpoint, its canonical view and the name of the mapping used. `config`: the
    Hugging Face directory with config.json and side files (needed for a PyTorch DCP source)."""
    from converter.mapping.names import BUILTIN, detect_mapping, load_mapping
    from converter.sources.dcp import DcpCheckpoint, is_dcp

    dcp = is_dcp(src)
    if dcp:
        ckpt = DcpCheckpoint.open(src, config)
    elif config is not None:
        raise MxconvError("--config is for PyTorch DCP sources (a directory with .metadata); this source "
                          "has its own config.json")
    else:
        ckpt = SourceCheckpoint.open(src)
    family = ckpt.check_architecture()

    name = detect_mapping(ckpt.tensors) if mapping == "auto" else mapping
    if name in BUILTIN and name not in family.mappings:
        raise MappingError(f"the {name} naming has no rules for {family.name} models; mappings for "
                           f"{family.name}: {', '.join(family.mappings)} (or a mapping YAML file)")
    m = load_mapping(name)
    num_layers = int(ckpt.config.get("num_hidden_layers", 0))
    derivations = m.plan({n: i.shape for n, i in ckpt.tensors.items()}, num_layers,
                         vocab_size=ckpt.config.get("vocab_size"))
    if dcp:  # renames and row slices become byte ranges of the source tensors: read as pieces
        ckpt = ckpt.canonical(derivations)
        return ckpt, CanonicalView(ckpt, None), m.name
    identity = all(d.op == "rename" and d.sources == (t,) for t, d in derivations.items())
    return ckpt, CanonicalView(ckpt, None if identity else derivations), m.name


def open_view(src: str, mapping: str, **options) -> CanonicalView:
    """The canonical view alone: how each node of a Ray cluster opens the source again (with the
    driver's `open_source` arguments, paths absolute)."""
    return open_source(src, mapping, **options)[1]


def resolve_recipe(recipe: str | Path | Recipe | None, family: Family | None = None, **overrides) -> Recipe:
    """A Recipe from an object, a path, a built-in name, a role of the family (mxfp8, trtllm,
    bf16, ...) or None (the family's default recipe)."""
    if not isinstance(recipe, Recipe) and family is not None and not isinstance(recipe, Path):
        recipe = recipe_for(family, recipe)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(DEFAULT_RECIPE if recipe is None else recipe)
    return r.with_options(**overrides)


def plan_conversion(src: str | Path, *, recipe: str | Path | Recipe | None = None, mapping: str = "auto",
                    max_shard_size: str | int = "5GB", config: str | Path | None = None, **recipe_overrides
                    ) -> tuple[SourceCheckpoint, CanonicalView, str, ConversionPlan]:
    ckpt, view, mapping_name = open_source(src, mapping, config)
    r = resolve_recipe(recipe, ckpt.family, **recipe_overrides)
    fmt = ckpt.detect_format(view.tensors)
    check_source_tensors(ckpt, view, fmt, ckpt.family)
    plan = build_plan(view, fmt, r, int(ckpt.config.get("num_hidden_layers", 0)), parse_size(max_shard_size))
    return ckpt, view, mapping_name, plan


def convert(src: str | Path, dst: str | Path, *, recipe: str | Path | Recipe | None = None,
            mapping: str = "auto", device: str = "cpu", workers: int | None = None, max_shard_size: str | int = "5GB",
            overwrite: bool = False, dry_run: bool = False, quiet: bool = False, requantize: bool | None = None,
            scale_rule: str | None = None, allow_nonfinite: bool | None = None, hash_sources: bool = True,
            scale_zero_blocks: str | None = None, config: str | Path | None = None, ray: str | None = None,
            processes: int | None = None) -> ConversionResult:
    """Convert the checkpoint in `src` into `dst`; what `mxconv convert` does. `config`: the
    Hugging Face directory that supplies config.json and side files to a PyTorch DCP source. `ray`:
    write the shards on a Ray cluster ("auto", "local", or an address; see run/cluster.py).
    `processes`: conversion processes on this machine (None: see run/processes.py)."""
    if workers is not None and workers < 1:
        raise MxconvError(f"--workers must be at least 1, got {workers}")
    src, dst = Path(src), Path(dst)
    if ray is not None:  # the nodes see the same paths, not the same working directory
        from converter.mapping.names import BUILTIN

        src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
        if mapping != "auto" and mapping not in BUILTIN:  # a YAML file
            mapping = os.path.abspath(mapping)
    ckpt, view, mapping_name, plan = plan_conversion(
        src, recipe=recipe, mapping=mapping, max_shard_size=max_shard_size, config=config,
        ue8m0_source=None if requantize is None else ("requantize" if requantize else "relayout"),
        scale_rule=scale_rule, allow_nonfinite=allow_nonfinite, scale_zero_blocks=scale_zero_blocks)
    result = ConversionResult(dst, ckpt, plan, mapping_name, dry_run=dry_run)
    if dry_run:
        return result
    moe_layout = None
    if plan.recipe.moe_layout == "trtllm":
        from converter.numerics.trtllm_layout import LAYOUT_METADATA as moe_layout
    options = {"device": device, "workers": workers, "max_shard_size": parse_size(max_shard_size),
               "mapping": mapping_name}
    extra = {}
    if config is not None:
        options["config"] = extra["config"] = str(Path(config).resolve())
    opener = functools.partial(open_view, str(src), mapping_name if mapping == "auto" else mapping, **extra)
    return write_checkpoint(result, view, output_config(ckpt.config, plan, moe_layout), device=device,
                            workers=workers, overwrite=overwrite, quiet=quiet, hash_sources=hash_sources,
                            options=options, ray=ray, opener=opener, processes=processes)


def write_checkpoint(result: ConversionResult, view: CanonicalView, config: dict, *, device: str,
                     workers: int | None, overwrite: bool, quiet: bool, hash_sources: bool, options: dict,
                     origin: dict | None = None, ray: str | None = None, opener=None,
                     processes: int | None = None) -> ConversionResult:
    """Execute a plan into result.dst: shards (resumable), side files, index and config, then the
    provenance file that marks the checkpoint complete. Shared by convert and unshuffle. With
    `ray`, the shards are written by the nodes of a Ray cluster, each opening the source with
    `opener()` (a picklable callable that returns the canonical view); without it, by `processes`
    processes of this machine (None: `run.processes.process_count`), which are sent `view`."""
    ckpt, plan, dst = result.source, result.plan, result.dst
    if ray is None:
        devices = resolve_devices(device, workers)
        cluster = nullcontext()
    else:  # the devices are the nodes': only the name is checked here
        from converter.run.cluster import check_device, connect, run_on_cluster

        check_device(device)
        cluster = connect(ray)
    fingerprint = plan_fingerprint(ckpt, plan, result.mapping, view)
    state = preflight_destination(ckpt.root, dst, fingerprint, plan, overwrite, ckpt.files, ckpt.side_root)
    result.source_notes = state.sources.notes()
    if state.sources.stale_shards and state.sources.changed:
        result.source_notes.append(f"{len(state.sources.stale_shards)} of {len(plan.shards)} output shard(s) "
                                   "were made from changed source files: redone")
    damaged = [s.name for s in plan.shards if s.name not in state.done_shards
               and s.name not in state.sources.stale_shards and (dst / s.name).is_file()]
    if damaged and not state.clear:
        result.source_notes.append(f"output shard(s) {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''} "
                                   "not as planned (truncated or changed since written): redone")
    if state.complete:
        result.already_complete = True
        result.skipped_shards = len(plan.shards)
        if state.sources.confirmed:
            try:
                record_manifest(dst, fingerprint, lock=True)
            except MxconvError:
                pass  # best effort: the next rerun hashes those files again
        return result
    with cluster as ray_api:  # connected before DST is touched: a wrong address changes nothing
        prepare_destination(dst, fingerprint, state)
        todo = [s for s in plan.shards if s.name not in state.done_shards]
        result.skipped_shards = len(plan.shards) - len(todo)
        start = time.perf_counter()
        hasher = SourceHasher(ckpt.hashed_files if hash_sources and ray is None else []).start()
        total = result.input_converted = sum(j.input_bytes for s in todo for j in s.jobs)
        try:
            if ray is not None:  # the nodes hash the source files they read
                hashes, result.cluster = run_on_cluster(ray_api, todo, view, ckpt, opener, fingerprint, dst,
                                                        plan.recipe, device=device, workers=workers,
                                                        hash_sources=hash_sources, quiet=quiet, processes=processes)
                options = dict(options, ray=ray)
            else:
                if processes is None:
                    processes = process_count(device, workers)
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
                          desc="convert", dynamic_ncols=True) as bar:
                    result.processes = write_shards(todo, processes, {"dst": str(dst),
                                                                      "recipe": plan.recipe},
                                                    devices, bar.update, hasher.release, view=lambda: view)
        except BaseException as e:
            _record_hashes_so_far(dst, fingerprint, ckpt.files, hasher)
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
                raise Interrupted(_resume_hint(dst, plan)) from None
            raise
    with interrupted_as(lambda: _resume_hint(dst, plan)):
        if ray is None:
            hashes, hub = hasher.result(), set(hasher.recorded)
        else:  # the nodes used the same records (hub_digests.py) wherever there was one
            hub = {n for n, sha in recorded_sha256s(ckpt.hashed_files).items() if hashes.get(n) == sha}
        moved = changed_during_run(fingerprint, ckpt.files)
        if moved is not None:
            raise SourceError("changed while it was being converted (its size, mtime or ctime moved); rerun the "
                              "same command when it no longer changes: the shards made from it are redone", file=moved)
        result.copied_files = copy_side_files(ckpt.side_root, dst)
        write_index_and_config(dst, plan, config)
        record_manifest(dst, fingerprint, hashes)
        write_provenance(dst, ckpt, plan, mapping=result.mapping, source_hashes=hashes, options=options,
                         origin=origin, hub_recorded=hub)
    result.seconds = time.perf_counter() - start
    return result


def _resume_hint(dst: Path, plan: ConversionPlan) -> str:
    """For Ctrl-C: finished shards are those renamed into place (temporary ones never are)."""
    done = sum((dst / s.name).is_file() for s in plan.shards)
    return f"{done} of {len(plan.shards)} shard(s) done; rerun the same command to resume"


def _record_hashes_so_far(dst: Path, fingerprint: dict, files: list[Path], hasher: SourceHasher) -> None:
    """An interrupted run keeps the sha256 of the source files hashed so far in its manifest (for
    files that did not change meanwhile), so that a resume from a copy of the source can tell
    they are the same bytes. Best effort, and quick: pending hashes are dropped."""
    try:
        hashes = hasher.finished()
        if hashes and changed_during_run(fingerprint, [p for p in files if p.name in hashes]) is None:
            record_manifest(dst, fingerprint, hashes)
    except Exception:
        pass
