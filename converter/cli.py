"""The `mxconv` command: each subcommand parses options and calls one library function."""

from __future__ import annotations

import gc
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from converter.errors import Interrupted, MxconvError, MxconvWarning, interrupted_as

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain help and one-line errors: no markup to eat "mxconv[ray]"
                  help="Convert DeepSeek V3/V3.2, Kimi K2 and Qwen3-MoE checkpoints to bit-exact MXFP8 for SGLang on Blackwell.")

CONFIG_HELP = ("PyTorch DCP sources: the Hugging Face model directory (config.json, tokenizer) the "
               "training run started from")
DEVICE_HELP = "where the numerics run: cpu, cuda (all visible GPUs) or cuda:N; output bytes are identical"
RAY_HELP = ("write the shards on the nodes of a Ray cluster that share SRC and DST at the same paths: auto (the "
            "cluster this machine is in), local (a new Ray instance here), or an address (ray://HOST:10001); "
            "--device and --workers then apply to each node; needs `pip install 'mxconv[ray]'`")


def _version(value: bool) -> None:
    if value:
        from converter.version import __version__

        typer.echo(f"mxconv {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """Convert DeepSeek V3/V3.2, Kimi K2 and Qwen3-MoE checkpoints to bit-exact MXFP8 for SGLang on Blackwell."""


def _fail(err: Exception) -> None:
    typer.echo(f"mxconv: error: {err}", err=True)
    raise typer.Exit(1)


@contextmanager
def _interruptible(default: str):
    """Ctrl-C: one line saying what is kept and how to go on (the command's own `Interrupted`
    message, else `default`), exit status 130, no traceback. (typer would exit 130 silently.)"""
    try:
        yield
    except KeyboardInterrupt as e:
        message = e.message if isinstance(e, Interrupted) else default
        typer.echo(f"mxconv: interrupted: {message}", err=True)
        raise typer.Exit(130) from None


_RERUN = "rerun the same command to resume"


@app.command()
def convert(
    src: Path = typer.Argument(..., metavar="SRC",
                               help="source checkpoint directory (Hugging Face layout, or a PyTorch DCP "
                                    "training checkpoint: Megatron torch_dist, FSDP2)"),
    dst: Path = typer.Argument(..., metavar="DST",
                               help="output directory (absent or empty, or an earlier run to resume)"),
    recipe: Optional[str] = typer.Option(None, help="built-in recipe name, a role of the source's family (mxfp8, "
                                                    "trtllm, bf16, ...), or a recipe YAML path; default: the "
                                                    "family's mxfp8 recipe (deepseek_v3_mxfp8, qwen3_moe_mxfp8, ...)"),
    mapping: str = typer.Option("auto", help="source tensor naming: auto, hf, megatron, deepseek, torchtitan, or a YAML path"),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="jobs computed in parallel (default: one per CPU "
                                                            "core; with --device cuda, two per GPU, which is "
                                                            "also the most a GPU gets)"),
    processes: Optional[int] = typer.Option(None, min=1, help="processes that share the workers, each with its "
                                                              "own shards (default: one per 4 workers with 8 or "
                                                              "more, at most 8); the bytes do not depend on it"),
    max_shard_size: str = typer.Option("5GB", help="largest output shard, in bytes: 5GB, 500MB, 4GiB"),
    requantize: bool = typer.Option(False, "--requantize",
                                    help="UE8M0 FP8 sources: dequantize and requantize with the recipe's scale "
                                         "rule instead of the lossless re-layout"),
    scale_rule: Optional[str] = typer.Option(None, help="override the recipe's scale rule: rceil or floor"),
    scale_zero_blocks: Optional[str] = typer.Option(None, help="override the recipe's values of blocks with scale "
                                                               "byte 0: exact (TransformerEngine >= 2.13, default) "
                                                               "or flush (signed zeros: TE <= 2.12, torchao 0.18)"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="quantize NaN/Inf instead of failing (Inf saturates, NaN stays)"),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="replace an earlier mxconv run in DST made otherwise (an "
                                        "interrupted run of this same conversion is resumed, not redone; a "
                                        "folder mxconv did not write is never emptied)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and write nothing"),
    verify: bool = typer.Option(False, "--verify", help="run `mxconv verify` on the result"),
    push_to: Optional[str] = typer.Option(None, help="push the result to this Hub repo id when done"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
    no_source_hash: bool = typer.Option(False, "--no-source-hash",
                                        help="skip the sha256 of the source files (as much CPU as converting a BF16 "
                                             "source): mxconv.json then records their sizes only, and a resume "
                                             "from a moved or copied source redoes its shards"),
) -> None:
    """Convert SRC into an MXFP8 (or BF16) checkpoint in DST."""
    if not dry_run and ray is None:  # their torch imports overlap ours and the planning; started first:
        from converter.run.processes import process_count, warm_up  # theirs is the start's longest wait

        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as _import_quietly says, for them too
        warm_up(processes or process_count(device, workers), device, workers)
    if not dry_run and ray is None and not no_source_hash:  # hash the source on spare cores while torch imports
        from converter.sources.hashing import start_early

        start_early(src)
    with _interruptible(_RERUN):
        _import_quietly()
        if not dry_run and ray is None:  # a Ray driver reads no tensor
            _note_sigbus()
        from converter.run.pipeline import convert as run_convert
        from converter.run.summary import describe_plan, describe_result

        from converter.run.processes import dismiss_warm

        try:
            try:
                result = run_convert(src, dst, recipe=recipe, mapping=mapping, device=device, workers=workers,
                                     max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run, quiet=quiet,
                                     requantize=True if requantize else None, scale_rule=scale_rule,
                                     allow_nonfinite=True if allow_nonfinite else None,
                                     scale_zero_blocks=scale_zero_blocks, config=config, ray=ray,
                                     hash_sources=not no_source_hash, processes=processes)
            finally:  # warm processes no run took (already complete, an error): not idle through --verify
                dismiss_warm()
            if dry_run:
                typer.echo(describe_plan(result.source, result.plan, result.mapping, verbose=True))
                typer.echo("dry run: nothing written")
                return
            typer.echo(describe_result(result))
            if verify or push_to:  # a push refuses unverified conversions, so --push-to verifies first
                _run_verify(src, dst, device=device, workers=workers, quiet=quiet, config=config)
            if push_to:
                _run_push(dst, push_to, quiet=quiet)
        except MxconvError as e:
            _fail(e)


def _import_quietly() -> None:
    """Import the pipeline (and torch) with the cyclic collector off, then keep what was imported
    out of its sight: importing torch set off some 360 collections, and each full collection
    during planning walked all of torch's objects (0.15 s of start-up on a 2-core VM). Also keeps
    numpy's OpenBLAS (loaded with torch) to one thread: it starts one per core that spins a while,
    and a conversion does no BLAS (0.1-0.2 s of start-up CPU on 2 cores). Only for `convert`:
    `verify --logits` runs a forward pass, and on aarch64 torch's BLAS is OpenBLAS."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enabled = gc.isenabled()
    gc.disable()
    try:
        import converter.run.pipeline  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _note_sigbus() -> None:
    """The numerics read source bytes mapped from the page cache; a source file cut short while
    they do (copied over mid-run), or a disk read of a page the kernel must read again that fails,
    kills this process with SIGBUS, which Python cannot catch, as does a mapped output whose file
    system fills up: say so on the way out
    (converter/numerics/guard.c). Its conversion processes are named by this one instead
    (processes._died)."""
    from converter.numerics import native

    native.note_sigbus("mxconv: error: bus error: a source file was cut short while it was being converted, a "
                       "disk read of it failed, or the output's file system ran out of room; rerun the same "
                       "command when none is so\n")


def _run_verify(src: Path, dst: Path, **kwargs) -> None:
    from converter.verify.report import format_summary
    from converter.verify.runner import verify_checkpoint

    with interrupted_as("verify stopped, no report written; rerun the same command to verify"):
        report = verify_checkpoint(src, dst, **kwargs)
    typer.echo(format_summary(report))
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def verify(
    src: Path = typer.Argument(..., metavar="SRC", help="the source checkpoint DST was converted from"),
    dst: Path = typer.Argument(..., metavar="DST", help="a conversion made by `mxconv convert`"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write the JSON report here (it always "
                                                                  "goes to DST/mxconv_verify.json)"),
    html: Optional[Path] = typer.Option(None, "--html", help="write an HTML page with per-layer plots here"),
    logits: bool = typer.Option(False, "--logits", help="also compare the logits of SRC and of the dequantized "
                                                        "DST in transformers (models that fit in memory)"),
    device: str = typer.Option("cpu", help="where the bytes are re-derived: cpu, cuda (all visible GPUs) or "
                                           "cuda:N; the results are the same"),
    workers: Optional[int] = typer.Option(None, min=1, help="DST shards checked in parallel (default: one per "
                                                            "CPU core)"),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP + " (default: the one the "
                                                                               "conversion recorded)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Check DST against SRC (coverage, config, bytes, numerics, logits); exit 0 only if every check passes."""
    with _interruptible("verify stopped, no report written; rerun the same command to verify"):
        try:
            _run_verify(src, dst, device=device, workers=workers, quiet=quiet, report_path=report, html_path=html,
                        logits=logits, config=config)
        except MxconvError as e:
            _fail(e)


@app.command()
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="a checkpoint directory (a source or a conversion)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Say what a checkpoint is: architecture, precision, quantization, MoE layout, sizes, completeness;
    exit 1 when it lists problems or an unfinished conversion."""
    import json

    from converter.verify.inspect import exit_status, format_inspect, inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except MxconvError as e:
        _fail(e)
    typer.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))
    raise typer.Exit(exit_status(info))


def _run_push(dst: Path, repo_id: str, **kwargs) -> None:
    from converter.hub.push import push_checkpoint
    from converter.units import format_size

    r = push_checkpoint(dst, repo_id, **kwargs)
    for warning in r.warnings:
        typer.echo(f"mxconv: warning: {warning}", err=True)
    if r.model_card:
        typer.echo(f"wrote model card {r.model_card}")
    if r.dry_run:
        typer.echo(f"dry run: would upload {len(r.uploaded)} file(s) to {r.repo_id}"
                   + (f" (revision {r.revision})" if r.revision else "") + "; nothing sent")
        for name in r.uploaded:
            typer.echo(f"  {name}")
        return
    typer.echo(f"pushed to {r.url}: {len(r.uploaded)} file(s) uploaded ({format_size(r.bytes_uploaded)}), "
               f"{len(r.skipped)} already there ({format_size(r.bytes_skipped)}), {len(r.commits)} commit(s)"
               + (f" via {r.transfer}" if r.transfer else ""))
    if r.remote_only:
        typer.echo(f"mxconv: warning: {len(r.remote_only)} file(s) in the repo are not in {dst} and were left "
                   f"alone, e.g. {r.remote_only[0]}", err=True)


@app.command()
def push(
    dst: Path = typer.Argument(..., metavar="DST", help="a finished conversion"),
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="Hub repo id, e.g. my-org/DeepSeek-V3-MXFP8"),
    private: bool = typer.Option(False, "--private", help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if missing)"),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the stored login)"),
    commit_message: Optional[str] = typer.Option(None, help="message of the upload commits"),
    dry_run: bool = typer.Option(False, "--dry-run", help="write the model card, list what would be uploaded"),
    force: bool = typer.Option(False, "--force", help="push even if DST is incomplete or not verified"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Upload DST to the Hugging Face Hub with a model card (resumable; re-runs upload only what is missing)."""
    with _interruptible("rerun the same command to resume: files already on the Hub are skipped"):
        try:
            _run_push(dst, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
                      dry_run=dry_run, force=force, quiet=quiet)
        except MxconvError as e:
            _fail(e)


@app.command()
def unshuffle(
    src: Path = typer.Argument(..., metavar="SRC",
                               help="a checkpoint converted with --recipe deepseek_v3_mxfp8_trtllm"),
    dst: Path = typer.Argument(..., metavar="DST", help="output directory for the canonical MXFP8 checkpoint"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, min=1, help="jobs computed in parallel (default: one per CPU "
                                                            "core; with --device cuda, two per GPU, which is "
                                                            "also the most a GPU gets)"),
    max_shard_size: str = typer.Option("5GB", help="largest output shard, in bytes: 5GB, 500MB, 4GiB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier mxconv run in DST made otherwise"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help=RAY_HELP),
) -> None:
    """Undo the FlashInfer TRT-LLM expert pre-shuffle: back to canonical gate/up/down MXFP8."""
    from converter.run.summary import describe_result
    from converter.run.unshuffle import unshuffle as run_unshuffle

    with _interruptible(_RERUN):
        if ray is None:
            _note_sigbus()
        try:
            result = run_unshuffle(src, dst, device=device, workers=workers, max_shard_size=max_shard_size,
                                   overwrite=overwrite, quiet=quiet, ray=ray)
            typer.echo(describe_result(result))
        except MxconvError as e:
            _fail(e)


@app.command()
def demo(
    directory: Path = typer.Argument(Path("mxconv-demo"), metavar="DIRECTORY",
                                     help="where to build the tiny checkpoint and its conversion"),
    family: str = typer.Option("deepseek_v3", help="model family: deepseek_v3, deepseek_v32, kimi_k2, qwen3_moe"),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Build a tiny checkpoint of a model family (no download), convert it to MXFP8, verify it, summarize."""
    from converter.models.demo import build_checkpoint, describe_tiny
    from converter.models.family import load_family
    from converter.run.pipeline import convert as run_convert
    from converter.run.summary import describe_result

    with _interruptible("rerun the same command to start the demo again"):
        try:
            fam = load_family(family)
            src, dst = directory / "source-bf16", directory / "mxfp8"
            build_checkpoint(src, family=fam.name)
            typer.echo(f"built a tiny {fam.description} checkpoint in {src}: {describe_tiny(fam)}, real tensor names, "
                       "3 shards with weights split from their partners")
            result = run_convert(src, dst, device=device, overwrite=True, quiet=quiet, max_shard_size="1MB")
            typer.echo(describe_result(result))
            _run_verify(src, dst, device=device, quiet=True)
            typer.echo(f"next: mxconv inspect {dst}   |   mxconv convert YOUR_CHECKPOINT OUT --dry-run")
        except MxconvError as e:
            _fail(e)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, MxconvWarning):
        from tqdm import tqdm

        tqdm.write(f"mxconv: warning: {message}", file=sys.stderr)  # clears and redraws a progress bar
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _run_app() -> int:
    """The command, as an exit status (typer ends with SystemExit; errors become one line)."""
    # Our warnings (e.g. NaN quantized under --allow-nonfinite) always reach the user, one line each.
    warnings.simplefilter("default", MxconvWarning)
    warnings.showwarning = _show_warning
    try:
        app()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        typer.echo("mxconv: interrupted; rerun the same command to resume", err=True)
        return 130
    except MxconvError as e:
        typer.echo(f"mxconv: error: {e}", err=True)
        return 1
    except Exception as e:  # a bug or the machine (out of memory...): still one line, unless debugging
        if os.environ.get("MXCONV_DEBUG"):
            raise
        typer.echo(f"mxconv: internal error: {type(e).__name__}: {e} (rerun with MXCONV_DEBUG=1 for the "
                   "traceback; an interrupted convert resumes when rerun)", err=True)
        return 2
    return 0


def main() -> None:
    code = _run_app()
    # Skip the interpreter's teardown: finalizing torch's modules (and a CUDA context) costs 0.3-1 s
    # per run, and there is nothing left to clean up: every output file is closed and fsynced, and
    # threads still running (a source hasher after an error) only read.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
