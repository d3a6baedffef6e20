"""The sha256 that the Hugging Face Hub records for a file downloaded from it, read from what
huggingface_hub itself left beside the file, so that a conversion need not hash it again (sha256
costs about as much CPU as converting a BF16 source). Trusted exactly where huggingface_hub
trusts it, read-only, without huggingface_hub's locks (they would write into the source):

- the Hub cache (`hf download` / `snapshot_download` without --local-dir): a snapshot's file is a
  link to `blobs/<etag>`, and an LFS file's etag is its sha256 (64 hex digits; a 40-digit etag is
  a git blob id, not used), Xet-stored files included (their blob may link on into a shared
  store named by Xet hashes: only the first link counts);
- a `--local-dir` download: `<dir>/.cache/huggingface/download/<file>.metadata` holds the commit,
  the etag and the time it was written, and counts while the file's mtime is at most a second
  later (huggingface_hub's own rule: a file edited since is hashed again, here as there).

Deliberately free of torch (the CLI's early hasher runs before torch is imported).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")
_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")
_LEVELS = 4  # folders searched upwards for a --local-dir download's metadata (files up to 3 deep)


def recorded_sha256(path: Path) -> str | None:
    """The Hub's sha256 of `path` where a download recorded it (see above), else None."""
    path = Path(path)
    try:
        if path.is_symlink():
            # One hop only: the cache's blob may itself be a link on into huggingface_hub's shared
            # store (Xet downloads: <cache>/blobs/<2 hex>/<xet hash>), which is not a sha256.
            hop = Path(os.path.normpath(path.absolute().parent / os.readlink(path)))
            if (SHA256.fullmatch(hop.name) and hop.parent.name == "blobs"
                    and hop.parent.parent.name.startswith(_CACHE_PREFIXES) and hop.exists()):
                return hop.name
            return None
        mtime = path.stat().st_mtime
        for start in dict.fromkeys([path.absolute(), path.resolve()]):  # also past a linked folder
            folder, relative = start.parent, start.name
            for _ in range(_LEVELS):
                meta = folder / ".cache" / "huggingface" / "download" / f"{relative}.metadata"
                if meta.is_file():
                    lines = meta.read_text(encoding="utf-8").splitlines()
                    etag, written = lines[1].strip(), float(lines[2].strip())
                    return etag if SHA256.fullmatch(etag) and mtime - 1 <= written else None
                if folder.parent == folder:
                    break
                folder, relative = folder.parent, f"{folder.name}/{relative}"
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    return None


def recorded_sha256s(files: list[Path]) -> dict[str, str]:
    """{file name: the Hub's sha256} for those of `files` a download recorded."""
    return {Path(p).name: sha for p in files if (sha := recorded_sha256(Path(p))) is not None}
