"""Publish a converted checkpoint on the Hugging Face Hub.

Plan, validate, execute, like the conversion itself:
- validate locally: DST must be a complete (mxconv.json present, every indexed shard there) and
  verified (mxconv_verify.json with passed: true) conversion, unless forced; write the model card;
- plan against the Hub: create the repo (and branch) if needed, list what the revision already
  holds and skip every local file whose content is already there (sha256 for LFS files, the git
  blob id for small ones), so a re-run uploads only what is missing;
- execute: upload the rest with `HfApi.upload_folder` (huggingface_hub's resumable transfer: Xet
  when hf_xet is installed and the endpoint offers it, git-LFS otherwise), weight shards first in
  commits of bounded size, then config, index, card and provenance in the last commit, so that a
  half-finished push never looks loadable. Re-running an interrupted push resumes it: committed
  files are skipped, uploaded but uncommitted objects are not sent again (LFS batch, Xet dedup).

Token and endpoint resolve as in huggingface_hub: explicit token > HF_TOKEN > stored login;
`endpoint` argument > HF_ENDPOINT > huggingface.co. The token never appears in a message.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, RepoFile, constants
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    filter_repo_objects,
    validate_repo_id,
)
from tqdm.auto import tqdm

from converter.errors import HubError, OutputError, interrupted_as
from converter.files import CONFIG_FILE, INDEX_FILE, PROVENANCE_FILE, SINGLE_FILE, STATE_DIR, VERIFY_REPORT_FILE
from converter.hub.modelcard import write_model_card
from converter.hub.transport import (
    check_token,
    client_prefers_xet,
    hub_errors,
    offers_xet,
    resolve_token,
    transfer_protocol,
)

# Never uploaded: resume state, temporary files of atomic writes, caches.
IGNORE_PATTERNS = [STATE_DIR, f"{STATE_DIR}/*", "*.tmp", "*.partial", "*.incomplete", "*.lock", ".cache", ".cache/*"]
# One commit carries at most this many bytes of weights (a few DeepSeek shards), so a long push
# lands on the Hub piece by piece and an interruption loses at most one commit's worth of work.
DEFAULT_MAX_COMMIT_BYTES = 50 * 10**9
MAX_FILES_PER_COMMIT = 100
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class PushResult:
    """What a push did (or, with dry_run, would do). Paths are relative to DST, as in the repo."""

    repo_id: str
    url: str
    revision: str | None
    dry_run: bool
    uploaded: list[str] = field(default_factory=list)  # dry run: every file that would be considered
    skipped: list[str] = field(default_factory=list)  # already on the Hub with the same content
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    commits: list[str] = field(default_factory=list)  # commit URLs, in order
    remote_only: list[str] = field(default_factory=list)  # in the repo but not in DST (left alone)
    model_card: Path | None = None  # README.md written by this call
    transfer: str | None = None  # "xet" or "lfs": how the bytes travelled (None: nothing to send)
    warnings: list[str] = field(default_factory=list)  # what --force let through


def push_checkpoint(
    dst: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    quiet: bool = False,
    endpoint: str | None = None,
    max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
) -> PushResult:
    """Create `repo_id` if needed and upload DST to it; see the module docstring for the plan.

    Raises OutputError for an incomplete or unverified DST (unless `force`), HubError for anything
    the Hub or the network refused. With `dry_run`, writes the model card and returns the plan
    without any network access.
    """
    dst = Path(dst)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"invalid repo id {repo_id!r}: {e}") from e
    warnings = check_publishable(dst, force=force)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    result = PushResult(repo_id=repo_id, url=f"{endpoint}/{repo_id}", revision=revision, dry_run=dry_run,
                        warnings=warnings)
    if dry_run:
        result.model_card = write_model_card(dst, repo_id=repo_id)
        local = list_upload_files(dst)
        result.uploaded, result.bytes_uploaded = sorted(local), sum(local.values())
        return result

    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token, library_name="mxconv")
    with hub_errors(endpoint, repo_id, token, "preparing the repository"):
        repo_id, result.url, remote = _prepare_repo(api, token, repo_id, private=private, revision=revision)
    result.repo_id = repo_id
    result.model_card = write_model_card(dst, repo_id=repo_id)  # with the namespace the Hub resolved
    local = list_upload_files(dst)

    missing, present = _split_by_remote(dst, local, remote, quiet=quiet)
    result.skipped, result.bytes_skipped = sorted(present), sum(local[p] for p in present)
    result.remote_only = sorted(p for p in remote if p not in local and p != ".gitattributes")
    parts = plan_commits({p: local[p] for p in missing}, max_commit_bytes=max_commit_bytes)
    if not parts:
        return result
    with hub_errors(endpoint, repo_id, token, "choosing the upload protocol"):
        use_xet = client_prefers_xet() and offers_xet(endpoint, repo_id, revision, token)
    result.transfer = "xet" if use_xet else "lfs"

    message = commit_message or f"Upload {dst.name} with mxconv"
    total = sum(local[p] for p in missing)
    with transfer_protocol(result.transfer), _progress_bars(enabled=not quiet), \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"Pushing to {repo_id}", disable=quiet) as bar:
        for i, part in enumerate(parts, 1):
            with hub_errors(endpoint, repo_id, token, f"uploading commit {i} of {len(parts)}", resume=True), \
                    interrupted_as(f"{i - 1} of {len(parts)} commit(s) pushed ({len(result.uploaded)} of {len(missing)} "
                                  "file(s)); rerun the same command to resume: files already there are skipped"):
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=dst, revision=revision,
                    allow_patterns=[glob.escape(p) for p in part], ignore_patterns=IGNORE_PATTERNS,
                    commit_message=message if len(parts) == 1 else f"{message} (part {i}/{len(parts)})",
                )
            part_bytes = sum(local[p] for p in part)
            result.commits.append(info.commit_url)
            result.uploaded += part
            result.bytes_uploaded += part_bytes
            bar.update(part_bytes)
    return result


def check_publishable(dst: Path, *, force: bool = False) -> list[str]:
    """Refuse (OutputError) an incomplete or unverified conversion; with `force`, return the
    problems as warnings instead."""
    dst = Path(dst)
    if not dst.is_dir():
        raise OutputError("not a directory", file=dst)
    problems = []
    prov = _load_json(dst / PROVENANCE_FILE)
    if prov is None:
        problems.append(f"incomplete conversion: {PROVENANCE_FILE} is missing (mxconv writes it last; "
                        "re-run `mxconv convert`, which resumes)")
    elif isinstance(prov, str):
        problems.append(f"{PROVENANCE_FILE} is unreadable ({prov})")
    elif prov.get("complete") is False:
        problems.append(f"incomplete conversion: {PROVENANCE_FILE} says complete: false")
    if not (dst / CONFIG_FILE).is_file():
        problems.append(f"{CONFIG_FILE} is missing")
    problems += _missing_weights(dst)
    report = _load_json(dst / VERIFY_REPORT_FILE)
    if report is None:
        problems.append(f"unverified: {VERIFY_REPORT_FILE} is missing (run `mxconv verify` on it first)")
    elif isinstance(report, str):
        problems.append(f"unverified: {VERIFY_REPORT_FILE} is unreadable ({report})")
    elif report.get("passed") is not True:
        problems.append(f"unverified: {VERIFY_REPORT_FILE} reports failed checks")
    if problems and not force:
        raise OutputError("; ".join(problems) + "; refusing to push (--force pushes anyway)", file=dst)
    return problems


def list_upload_files(dst: Path) -> dict[str, int]:
    """Files of DST that a push publishes (relative POSIX path -> size), state and temp files excluded."""
    dst = Path(dst)
    sizes = {p.relative_to(dst).as_posix(): p.stat().st_size for p in sorted(dst.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(list(sizes), ignore_patterns=IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS))
    return {p: sizes[p] for p in kept}


def plan_commits(files: dict[str, int], *, max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES) -> list[list[str]]:
    """Weight files packed into commits of at most `max_commit_bytes` (one file per commit if it is
    larger), then everything else (config, index, card, provenance) in one final commit."""
    parts: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for path in sorted(p for p in files if p.endswith(WEIGHT_SUFFIXES)):
        if current and (current_bytes + files[path] > max_commit_bytes or len(current) >= MAX_FILES_PER_COMMIT):
            parts.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += files[path]
    if current:
        parts.append(current)
    rest = sorted(p for p in files if not p.endswith(WEIGHT_SUFFIXES))
    if rest:
        parts.append(rest)
    return parts


# --- planning against the remote ----------------------------------------------------------------


def _prepare_repo(api: HfApi, token: str, repo_id: str, *, private: bool, revision: str | None):
    """Create the repo (and branch) if needed; return (full repo id, URL, files the revision holds)."""
    check_token(api.endpoint, token)
    repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True)
    repo_id = repo_url.repo_id or repo_id
    if private and api.model_info(repo_id).private is False:
        raise HubError(f"{repo_id} already exists and is public; --private does not change an existing "
                       "repository's visibility (change it in the repo settings, or pick another name)")
    if revision and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
              if isinstance(f, RepoFile)}
    return repo_id, str(repo_url) + (f"/tree/{revision}" if revision else ""), remote


def _split_by_remote(dst: Path, local: dict[str, int], remote: dict, *, quiet: bool) -> tuple[list[str], list[str]]:
    """(missing, present): a local file is present when the revision holds the same bytes."""
    candidates = [p for p in local if p in remote and remote[p].size == local[p]]
    missing = [p for p in local if p not in candidates]
    present: list[str] = []
    if candidates:
        with tqdm(total=sum(local[p] for p in candidates), unit="B", unit_scale=True,
                  desc="Comparing with the Hub", disable=quiet) as bar, \
                ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            def same(path: str) -> bool:
                return _same_content(dst / path, remote[path], bar)
            for path, is_same in zip(candidates, pool.map(same, candidates)):
                (present if is_same else missing).append(path)
    return missing, present


def _same_content(path: Path, remote_file, bar) -> bool:
    lfs = getattr(remote_file, "lfs", None)
    if lfs:
        want = getattr(lfs, "sha256", None)
        digest = hashlib.sha256()
    else:
        want = remote_file.blob_id
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)  # git's blob id
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise OutputError(f"cannot read: {e.strerror}", file=path) from e
    return want is not None and digest.hexdigest() == want


# --- talking to the Hub --------------------------------------------------------------------------


@contextmanager
def _progress_bars(*, enabled: bool):
    """huggingface_hub's own upload bars follow --quiet; the global switch is restored afterwards."""
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


# --- local checks --------------------------------------------------------------------------------


def _load_json(path: Path) -> dict | str | None:
    """The JSON object in `path`, None if the file is absent, or why it could not be read."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return str(e)
    return data if isinstance(data, dict) else "not a JSON object"


def _missing_weights(dst: Path) -> list[str]:
    index = _load_json(dst / INDEX_FILE)
    if isinstance(index, dict):
        weight_map = index.get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards:
            return [f"{INDEX_FILE} maps no tensors"]
        absent = [s for s in shards if not (dst / s).is_file()]
        if absent:
            return [f"incomplete conversion: shards listed in {INDEX_FILE} are missing: {', '.join(absent)}"]
        return []
    if isinstance(index, str):
        return [f"{INDEX_FILE} is unreadable ({index})"]
    if not (dst / SINGLE_FILE).is_file():
        return [f"no weights: neither {INDEX_FILE} nor {SINGLE_FILE}"]
    return []
