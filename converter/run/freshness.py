"""Is each source file still the one the shards in DST were made from?

The resume manifest records, for every source file, its size, the sha256 of its safetensors
header and what the file system says about it for free (device, inode, mtime and ctime in
nanoseconds), and, once known, the sha256 of the whole file; and for every output shard, the
source files its tensors were derived from. A rerun compares:

- size or header different: the file changed;
- size, header, device, inode, mtime and ctime all the same: unchanged (no byte read). An edit
  in place changes mtime and ctime (a tool that restores mtime still changes ctime), one saved
  through a new file changes the inode too;
- otherwise the file may be the same bytes in another place or touched (a copy, `touch`, a hard
  link, a restore from a backup): its sha256 decides, computed now and compared with the one
  recorded (in the manifest, or in mxconv.json). Without a recorded sha256 it counts as changed.

A finished shard is kept only when every source file it was derived from is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import SourceError
from converter.plan.planner import ConversionPlan
from converter.plan.view import CanonicalView
from converter.sources.checkpoint import SourceCheckpoint
from converter.sources.hashing import sha256_files
from converter.sources.safetensors import MAX_HEADER
from converter.version import __version__

# Manifest keys that may differ between runs of the same conversion: compared file by file.
SOURCE_KEYS = ("sources", "shard_sources")
_STAT_FIELDS = ("dev", "ino", "mtime_ns", "ctime_ns")
_OTHER_HEADER = 64 * 1024


def plan_fingerprint(src: SourceCheckpoint, plan: ConversionPlan, mapping: str, view: CanonicalView) -> dict:
    """Everything the output bytes depend on. Device and worker count are deliberately absent:
    they never change a byte, so a resume may use other ones. `sources` and `shard_sources` are
    compared file by file (`check_sources`), everything else must be equal."""
    sources = {}
    for path in src.files:
        try:
            sources[path.name] = file_identity(path)
        except OSError as e:
            raise SourceError(f"cannot read: {e.strerror}", file=path) from e
    layout = hashlib.sha256(json.dumps(
        [[s.name, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in plan.shards]).encode()).hexdigest()
    config = hashlib.sha256(json.dumps(src.config, sort_keys=True).encode()).hexdigest()
    return {"mxconv_version": __version__, "recipe": plan.recipe.to_dict(), "mapping": mapping,
            "source_format": plan.source_format.value, "sources": sources, "source_config_sha256": config,
            "layout_sha256": layout, "shards": {s.name: s.file_size for s in plan.shards},
            "shard_sources": shard_sources(plan, view)}


def shard_sources(plan: ConversionPlan, view: CanonicalView) -> dict[str, list[str]]:
    """Output shard -> the source files (names) its tensors are derived from."""
    out = {}
    for shard in plan.shards:
        files = {f.name for job in shard.jobs for name in job.inputs for f in view.source_files(name)}
        out[shard.name] = sorted(files)
    return out


def file_identity(path: Path) -> dict:
    """Size, sha256 of the safetensors header (of the first 64 KiB for other files: a DCP
    .metadata or .distcp) and the file system's identity of the file."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > st.st_size or n > MAX_HEADER:  # not a safetensors file
            f.seek(0)
            n = _OTHER_HEADER
        header = hashlib.sha256(f.read(n)).hexdigest()
    return {"bytes": st.st_size, "header_sha256": header,
            "stat": {"dev": st.st_dev, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}}



def same_conversion(previous: dict, fingerprint: dict) -> bool:
    keys = (set(previous) | set(fingerprint)) - set(SOURCE_KEYS)
    return all(previous.get(k) == fingerprint.get(k) for k in keys)


@dataclass
class SourceCheck:
    changed: dict[str, str] = field(default_factory=dict)  # file name -> how it was found changed
    confirmed: dict[str, str] = field(default_factory=dict)  # file name -> what moved, sha256 equal
    stale_shards: list[str] = field(default_factory=list)  # finished shards that must be redone

    def notes(self) -> list[str]:
        lines = [f"source file {name} changed ({why})" for name, why in sorted(self.changed.items())]
        confirmed = sorted(self.confirmed.items())
        if len(confirmed) > 2:  # a copied or re-downloaded source: one line, not one per file
            whats = sorted({what for _, what in confirmed})
            lines.append(f"{len(confirmed)} source files ({confirmed[0][0]}, ...): {' or '.join(whats)} changed, but "
                         "their sha256 are the ones recorded: unchanged")
        else:
            lines += [f"source file {name}: {what} changed, but its sha256 is the one recorded: unchanged"
                      for name, what in confirmed]
        return lines


def check_sources(previous: dict, fingerprint: dict, files: dict[str, Path], recorded: dict[str, str],
                  all_files: list[Path]) -> SourceCheck:
    """Compare the source files now (`fingerprint`) with the manifest of the run that wrote DST
    (`previous`); `recorded`: sha256 by file name from that run's mxconv.json. Fills in
    `fingerprint`'s sha256 of every file found unchanged. Reads source files only when their
    sha256 has to decide."""
    check = SourceCheck()
    old_sources = previous.get("sources") if isinstance(previous.get("sources"), dict) else {}
    to_hash: dict[str, tuple[str, str]] = {}  # name -> (what moved, recorded sha256)
    for name, now in fingerprint["sources"].items():
        old = old_sources.get(name)
        if not isinstance(old, dict):
            check.changed[name] = "not in the earlier run"
        elif old.get("bytes") != now["bytes"]:
            check.changed[name] = f"size {old.get('bytes')} -> {now['bytes']} bytes"
        elif old.get("header_sha256") != now["header_sha256"]:
            check.changed[name] = "its header differs"
        else:
            sha = old.get("sha256") or recorded.get(name)
            moved = [k.removesuffix("_ns") for k in _STAT_FIELDS if (old.get("stat") or {}).get(k) != now["stat"][k]]
            if not moved:
                if sha:
                    now["sha256"] = sha
                continue
            what = ", ".join(moved) if old.get("stat") else "no file-system identity recorded"
            if not sha:
                check.changed[name] = f"{what} changed and no sha256 was recorded to compare"
            else:
                to_hash[name] = (what, sha)
    if to_hash:
        got = sha256_files([files[n] for n in to_hash], all_files)
        for name, (what, sha) in to_hash.items():
            if got.get(name) == sha:
                check.confirmed[name] = what
                fingerprint["sources"][name]["sha256"] = sha
            else:
                check.changed[name] = f"{what} changed, and its sha256 differs from the one recorded"
    old_uses = previous.get("shard_sources") if isinstance(previous.get("shard_sources"), dict) else {}
    for shard, uses in fingerprint["shard_sources"].items():
        if set(uses) & set(check.changed) or old_uses.get(shard, uses) != uses:
            check.stale_shards.append(shard)
    return check


def recorded_hashes(provenance: dict | None) -> dict[str, str]:
    """sha256 by source file name from a finished conversion's mxconv.json (the file actually
    read: `derived_from` when DST was made by unshuffle)."""
    if not isinstance(provenance, dict):
        return {}
    block = provenance.get("derived_from") or provenance.get("source")
    shards = block.get("shards") if isinstance(block, dict) else None
    if not isinstance(shards, dict):
        return {}
    return {n: v["sha256"] for n, v in shards.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}


def changed_during_run(fingerprint: dict, files: list[Path]) -> Path | None:
    """The first source file whose file-system identity is not what it was when the run began
    (written to while it was being converted), or None."""
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            return path
        was = fingerprint["sources"][path.name]
        now = {"dev": st.st_dev, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
        if was["bytes"] != st.st_size or was["stat"] != now:
            return path
    return None
