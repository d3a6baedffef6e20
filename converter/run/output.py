"""The destination directory: its state (fresh, resumable, complete), the manifest that makes a
resume safe, its lock, and the side files copied from the source (the files written after the
shards are `provenance.py`'s)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import OutputError
from converter.files import (
    CONFIG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PROVENANCE_FILE,
    SINGLE_FILE,
    STATE_DIR,
    VERIFY_REPORT_FILE,
)
from converter.plan.planner import ConversionPlan, ShardPlan
from converter.run.freshness import SOURCE_KEYS, SourceCheck, check_sources, recorded_hashes, same_conversion
from converter.run.writer import fsync_dir, write_atomic, write_bytes_atomic
from converter.sources.checkpoint import PICKLE_SUFFIXES
from converter.units import format_size

# Source files never copied into the destination: weights and what mxconv writes itself.
_SKIP_NAMES = {CONFIG_FILE, INDEX_FILE, SINGLE_FILE, PROVENANCE_FILE, VERIFY_REPORT_FILE}
_SKIP_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
_COPY_CHUNK = 16 * 1024 * 1024
_TEMP_SUFFIXES = (".partial", ".tmp")  # what mxconv leaves in the state directory when killed
LOCK_FILE = "lock"  # in the state directory; flock'ed while a conversion writes DST


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


@dataclass
class DestinationState:
    """What DST holds, found without changing anything (`inspect_destination`)."""

    done_shards: set[str]
    complete: bool
    clear: bool = False  # --overwrite: DST holds another mxconv run, which is removed first
    resumed: bool = False  # DST holds an interrupted (or damaged) run of this same conversion
    leftovers: list[Path] = field(default_factory=list)  # temporary files of an interrupted run
    reclaimable: int = 0  # bytes freed before writing starts (leftovers, or everything when clearing)
    sources: SourceCheck = field(default_factory=SourceCheck)  # what changed in the source since DST was written


def inspect_destination(dst: Path, fingerprint: dict, plan: ConversionPlan, overwrite: bool,
                        src_root: Path | None = None, src_files: list[Path] | None = None) -> DestinationState:
    """Read-only: is DST fresh, a resumable or finished run of this conversion, another mxconv
    run (refused unless `overwrite`), or something else (always refused)? A finished shard counts as done only if every source file
    it was made from is unchanged (`freshness.check_sources`, which may hash `src_files`); that
    check fills in `fingerprint`'s sha256 of the files found unchanged."""
    dst = Path(dst)
    try:
        if not dst.exists():
            return DestinationState(set(), False)
        if not dst.is_dir():
            raise OutputError("destination exists and is not a directory", file=dst)
        previous = _read_manifest(dst)
        if previous is None and _only_state_dir(dst):  # empty, or killed before the manifest was written
            leftovers = _leftovers(dst)
            return DestinationState(set(), False, leftovers=leftovers, reclaimable=sum(_size(p) for p in leftovers))
        if previous is None or not same_conversion(previous, fingerprint):
            ours = previous is not None or (dst / PROVENANCE_FILE).is_file()  # --overwrite empties only an mxconv run
            if not overwrite or not ours:  # (anything else may be someone's files: a mistyped path deletes nothing)
                raise OutputError(_refusal(dst, previous, fingerprint), file=dst)
            _check_clearable(dst)
            return DestinationState(set(), False, clear=True, reclaimable=_tree_bytes(dst))
        files = {p.name: p for p in src_files or []}
        sources = check_sources(previous, fingerprint, files, recorded_hashes(_read_json(dst / PROVENANCE_FILE)),
                                list(src_files or []))
        stale = set(sources.stale_shards)
        done = {s.name for s in plan.shards if s.name not in stale and shard_is_done(dst / s.name, s)}
        leftovers = _leftovers(dst) + [dst / name for name in sorted(stale) if (dst / name).exists()]
        complete = (not stale and len(done) == len(plan.shards) and _finished(dst, plan)
                    and (src_root is None or _side_files_present(src_root, dst)))
        return DestinationState(done, complete, resumed=not complete, leftovers=leftovers,
                                reclaimable=sum(_size(p) for p in leftovers), sources=sources)
    except OSError as e:
        raise OutputError(f"cannot inspect the destination: {e.strerror}", file=e.filename or dst) from e


def prepare_destination(dst: Path, fingerprint: dict, state: DestinationState) -> None:
    """Make DST ready for writing: empty it when clearing, remove an interrupted run's temporary
    files and its completion marker, verify report, index and config (a DST being resumed or
    repaired must not look complete), then record the manifest.

    Takes DST's lock first (held until `write_provenance` or the end of the process), so a second
    mxconv started on the same DST, say by a job scheduler re-queueing a job that is still running,
    is refused instead of writing the same temporary files."""
    dst = Path(dst)
    try:
        (dst / STATE_DIR).mkdir(parents=True, exist_ok=True)
        _lock(dst)
        if state.clear:
            _clear(dst)
        # the marker first; a verify report from before a repair no longer vouches for anything
        for name in (PROVENANCE_FILE, VERIFY_REPORT_FILE, INDEX_FILE, CONFIG_FILE):
            (dst / name).unlink(missing_ok=True)
        for path in state.leftovers:
            path.unlink(missing_ok=True)
        fsync_dir(dst)
        manifest = dst / STATE_DIR / MANIFEST_FILE
        if _read_manifest(dst) != fingerprint:
            write_bytes_atomic(manifest, json_bytes(fingerprint))
    except OSError as e:
        raise OutputError(f"cannot prepare the destination: {e.strerror}", file=e.filename or dst) from e


def record_manifest(dst: Path, fingerprint: dict, hashes: dict[str, str] | None = None,
                    lock: bool = False) -> None:
    """Rewrite the manifest with the sha256 of the source files in `hashes` added: at the end of
    a run, when a run is interrupted (the files hashed so far), or, with `lock`, when a finished
    DST's source was found unchanged by its sha256 (the new file-system identity spares the next
    rerun that hashing)."""
    for name, sha in (hashes or {}).items():
        if name in fingerprint["sources"]:
            fingerprint["sources"][name]["sha256"] = sha
    try:
        if lock:
            _lock(dst)
        write_bytes_atomic(dst / STATE_DIR / MANIFEST_FILE, json_bytes(fingerprint))
    except OSError as e:
        raise OutputError(f"cannot update the manifest: {e.strerror}", file=e.filename or dst) from e
    finally:
        if lock:
            unlock(dst)


def incomplete_reason(dst: Path) -> str | None:
    """None for a finished mxconv conversion; otherwise one line saying what is missing, for
    `inspect`, `verify` and `push` to show."""
    dst = Path(dst)
    manifest = _read_manifest(dst)
    if (dst / PROVENANCE_FILE).is_file() and _provenance_complete(dst):
        return None
    if not isinstance(manifest, dict):
        return f"no {PROVENANCE_FILE}: not a finished mxconv conversion"
    planned = manifest.get("shards") or {}
    have = sum(1 for name in planned if (dst / name).is_file())
    return (f"interrupted mxconv conversion: {have} of {len(planned)} shards written, no {PROVENANCE_FILE}; "
            "rerun the same `mxconv convert` command to resume it")


def _refusal(dst: Path, previous: dict | None, fingerprint: dict) -> str:
    if previous is None:
        if (dst / PROVENANCE_FILE).exists():
            return (f"destination holds an mxconv conversion without its resume manifest ({STATE_DIR}/"
                    f"{MANIFEST_FILE}); use --overwrite to convert again")
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in dst.iterdir())
        held = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return (f"destination is not empty and was not written by mxconv (it holds {held}); mxconv writes "
                "into a new or empty directory or one of its own runs (--overwrite replaces only those): "
                "pick another directory")
    changed = sorted({_WHAT_CHANGED.get(k, k) for k in fingerprint
                      if k not in SOURCE_KEYS and previous.get(k) != fingerprint[k]})
    what = f"made otherwise (changed: {', '.join(changed) or 'the manifest'})"
    if (dst / PROVENANCE_FILE).exists():
        return f"destination holds a finished conversion {what}; use --overwrite to replace it, or another destination"
    return (f"destination holds an unfinished conversion {what}; rerun with the same source, recipe and options to "
            "resume it, or use --overwrite to start again")


# fingerprint keys (freshness.plan_fingerprint) in a user's words
_WHAT_CHANGED = {"layout_sha256": "the output layout (which tensor goes in which shard)", "shards": "the shard sizes (--max-shard-size)",
                 "source_config_sha256": "the source's config.json", "mxconv_version": "the mxconv version"}


def _read_manifest(dst: Path) -> dict | None:
    return _read_json(dst / STATE_DIR / MANIFEST_FILE)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shard_is_done(path: Path, shard: ShardPlan) -> bool:
    """Finished shards were renamed into place only after a complete, fsynced write; a name that
    exists with the planned size and the planned header is one of them."""
    try:
        if not path.is_file() or path.stat().st_size != shard.file_size:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except OSError:
        return False


def _finished(dst: Path, plan: ConversionPlan) -> bool:
    try:
        index_ok = (dst / INDEX_FILE).read_bytes() == index_bytes(plan)
    except OSError:
        return False
    return index_ok and (dst / CONFIG_FILE).is_file() and _provenance_complete(dst)


def _provenance_complete(dst: Path) -> bool:
    try:
        data = json.loads((dst / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("complete") is True


def _leftovers(dst: Path) -> list[Path]:
    """Temporary files an interrupted run left: partial shards and temporary copies in the state
    directory, and hidden `.NAME.tmp` files next to the outputs (from older mxconv versions)."""
    found = [p for p in (dst / STATE_DIR).glob("*") if p.suffix in _TEMP_SUFFIXES and p.is_file()]
    found += [p for p in dst.glob(".*.tmp") if p.is_file()]
    return sorted(found)


def _only_state_dir(dst: Path) -> bool:
    """DST holds nothing but a state directory with temporary files (and the lock) in it."""
    for child in dst.iterdir():
        if child.name != STATE_DIR or not child.is_dir():
            return False
    return all(p.suffix in _TEMP_SUFFIXES or p.name == LOCK_FILE for p in (dst / STATE_DIR).iterdir())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_bytes(root: Path) -> int:
    return sum(_size(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _check_clearable(dst: Path) -> None:
    resolved = dst.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise OutputError("refusing to empty this directory for --overwrite; pick a dedicated output directory",
                          file=dst)


def _clear(dst: Path) -> None:
    # The manifest goes first: a crash half-way leaves a DST that is refused, never resumed.
    # The lock file stays: deleting it while held would let another process lock a new one.
    (dst / STATE_DIR / MANIFEST_FILE).unlink(missing_ok=True)
    for child in [*dst.iterdir(), *(dst / STATE_DIR).iterdir()]:
        if child.name == STATE_DIR or child.parent.name == STATE_DIR and child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# DST path -> open lock file of this process (flock is per open file: a kill releases it)
_held_locks: dict[Path, int] = {}


def _lock(dst: Path) -> None:
    key = dst.resolve()
    if key in _held_locks:  # this process already holds it (an earlier call that failed)
        return
    path = dst / STATE_DIR / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise OutputError(f"another mxconv process{f' (pid {holder})' if holder else ''} is writing this "
                          "destination; wait for it to finish or stop it, then rerun", file=dst) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = fd


def unlock(dst: Path) -> None:
    fd = _held_locks.pop(dst.resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # no stale pid in a finished DST
        os.close(fd)  # releases the flock; the file stays (see _clear)


def check_free_space(dst: Path, needed: int, reclaimable: int = 0) -> None:
    """DST's file system (its nearest existing ancestor when DST does not exist yet) must hold
    `needed` more bytes, counting `reclaimable` bytes that are deleted before writing."""
    where = Path(dst).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        raise OutputError(f"cannot tell the free disk space: {e.strerror}", file=dst) from e
    if free + reclaimable < needed:
        extra = f" (+{format_size(reclaimable)} freed first)" if reclaimable else ""
        raise OutputError(f"not enough free disk space: the conversion needs {format_size(needed)} more, "
                          f"{format_size(free)} are free{extra}", file=dst)


def side_files(src_root: Path) -> list[Path]:
    """Tokenizer, generation config, custom code, license, README: everything but weights,
    their indexes and what mxconv writes itself (relative paths)."""
    found = []
    for path in sorted(Path(src_root).rglob("*")):
        rel = path.relative_to(src_root)
        if (not path.is_file() or any(p.startswith(".") for p in rel.parts)
                or rel.name in _SKIP_NAMES or rel.suffix in _SKIP_SUFFIXES
                or any(rel.name.endswith(s + ".index.json") for s in _SKIP_SUFFIXES)):
            continue
        found.append(rel)
    return found


def _side_files_present(src_root: Path, dst: Path) -> bool:
    return all(_size(dst / rel) == _size(Path(src_root) / rel) and (dst / rel).is_file()
               for rel in side_files(src_root))


def copy_side_files(src_root: Path, dst: Path) -> list[str]:
    """Copy the side files, each through a fsynced temporary file in DST's state directory."""
    copied = []
    for rel in side_files(src_root):
        target = dst / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src_root / rel, "rb") as fin:
                write_atomic(target, lambda fout: shutil.copyfileobj(fin, fout, _COPY_CHUNK), dst / STATE_DIR)
        except OSError as e:
            raise OutputError(f"cannot copy {rel}: {e.strerror}", file=e.filename or target) from e
        copied.append(str(rel))
    return copied


def index_bytes(plan: ConversionPlan) -> bytes:
    return json_bytes({"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()})
