"""A small, real HTTP server that speaks the Hugging Face Hub endpoints huggingface_hub calls to
create a repo and upload a folder over git-LFS "basic" transfers, so push tests run end to end
against a socket on 127.0.0.1 instead of a mocked HfApi.

Implemented (model repos only):
  GET  /api/whoami-v2
  POST /api/repos/create
  GET  /api/models/{ns}/{name}[/revision/{rev}]
  POST /api/models/{ns}/{name}/branch/{branch}
  GET  /api/models/{ns}/{name}/tree/{rev}?recursive=true
  POST /api/models/{ns}/{name}/preupload/{rev}
  POST /api/models/{ns}/{name}/commit/{rev}          (ndjson: header, file, lfsFile)
  GET  /api/models/{ns}/{name}/xet-write-token/{rev}  (always 404: this server has no Xet storage)
  POST /api/validate-yaml
  POST /{ns}/{name}.git/info/lfs/objects/batch       (git-lfs batch API, "basic" transfer)
  PUT  /lfs-objects/{ns}/{name}/{oid}?sig=...        (pre-signed upload URL: no Authorization header)
  POST /lfs-verify/{ns}/{name}

Any other request is answered 404 and kept in `unhandled`, so a test can assert there was none.
Committed files live on disk under root/repos/{ns}/{name}/{branch}/ so tests compare bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"".join(b"*.%s filter=lfs diff=lfs merge=lfs -text\n" % ext for ext in (b"bin", b"pt", b"safetensors"))
LFS_SUFFIXES = (".bin", ".pt", ".safetensors")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    blob_id: str  # git sha1 of the content (regular file) or of the LFS pointer
    sha256: str | None = None  # LFS files only

    def to_json(self, path: str) -> dict:
        d = {"type": "file", "path": path, "size": self.size, "oid": self.blob_id}
        if self.sha256:
            d["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return d


@dataclass
class Branch:
    files: dict[str, Entry] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # oldest first: {"oid", "summary", "paths"}


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, Branch] = field(default_factory=dict)


@dataclass
class Fault:
    """Answer the `nth` request matching method and path pattern with `status`, once."""

    method: str
    pattern: str
    status: int
    nth: int
    seen: int = 0


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class HubServer:
    def __init__(self, root: Path, *, users: dict[str, str], lfs_threshold: int = 10 * 1024 * 1024):
        self.root = Path(root)
        self.users = dict(users)  # token -> user name
        self.lfs_threshold = lfs_threshold  # files this large go to LFS whatever their name
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.errors: list[str] = []  # exceptions raised by the server itself
        self.lfs_puts: list[str] = []  # oids actually stored by a PUT
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._key = secrets.token_bytes(16)
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- for tests -----------------------------------------------------------------------------

    def fail_once(self, method: str, pattern: str, status: int, *, nth: int = 1) -> None:
        self.faults.append(Fault(method, pattern, status, nth))

    def repo_dir(self, repo_id: str, revision: str = "main") -> Path:
        return self.root / "repos" / repo_id / revision

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        with self.lock:
            return dict(self.repos[repo_id].branches[revision].files)

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        with self.lock:
            return list(self.repos[repo_id].branches[revision].commits)

    # --- storage ---------------------------------------------------------------------------------

    def lfs_dir(self, repo_id: str) -> Path:
        return self.root / "lfs" / repo_id

    def sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._key, f"{repo_id}:{oid}".encode(), hashlib.sha256).hexdigest()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.seen < fault.nth and fault.method == method and re.search(fault.pattern, path):
                    fault.seen += 1
                    if fault.seen == fault.nth:
                        return fault
        return None

    def commit(self, repo: Repo, revision: str, summary: str, changes: dict[str, bytes | Entry]) -> str:
        """Apply changes: path -> bytes for a regular file, or the Entry of an uploaded LFS object."""
        branch = repo.branches[revision]
        for path, change in changes.items():
            target = self.repo_dir(repo.repo_id, revision) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(change, Entry):
                shutil.copyfile(self.lfs_dir(repo.repo_id) / change.sha256, target)
                branch.files[path] = change
            else:
                target.write_bytes(change)
                branch.files[path] = Entry(size=len(change), blob_id=git_blob_sha1(change))
        parent = branch.commits[-1]["oid"] if branch.commits else ""
        oid = hashlib.sha1(f"{parent}\n{summary}\n{sorted(changes)}\n{secrets.token_hex(4)}".encode()).hexdigest()
        branch.commits.append({"oid": oid, "summary": summary, "paths": sorted(changes)})
        return oid


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # (method, path regex, handler name); groups are URL-unquoted and passed by name
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", "tree"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{_REPO}/xet-write-token/(?P<rev>[^/]+)", "xet_write_token"),
    ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-objects/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
    ("POST", rf"/lfs-verify/{_REPO}", "lfs_verify"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle: otherwise delayed ACKs add ~40 ms to every request.
    disable_nagle_algorithm = True
    wbufsize = -1

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.hub.requests.append((method, split.path))
        self.body = self._read_body() if method in ("POST", "PUT") else b""  # always drain the request
        self.query = parse_qs(split.query)
        try:
            if (fault := self.hub.take_fault(method, split.path)) is not None:
                raise HttpError(fault.status, f"injected failure ({fault.status})")
            for route_method, pattern, name in _ROUTES:
                m = re.fullmatch(pattern, split.path)
                if route_method == method and m:
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with self.hub.lock:
                        return getattr(self, f"_{name}")(**args)
            self.hub.unhandled.append((method, split.path))
            raise HttpError(404, f"no route for {method} {split.path}")
        except HttpError as e:
            headers = {"X-Error-Message": str(e)} | ({"X-Error-Code": e.code} if e.code else {})
            self._send(e.status, {"error": str(e)}, headers=headers)
        except Exception as e:  # a server bug must fail the test, not stall it in client retries
            self.hub.errors.append(f"{method} {split.path}: {e!r}")
            self._send(400, {"error": f"test server error: {e!r}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)

    def _send(self, status: int, body: object = None, *, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    # --- auth ----------------------------------------------------------------------------------

    def _user(self, *, required: bool) -> str | None:
        auth = self.headers.get("Authorization")
        user = self.hub.users.get(auth[len("Bearer "):]) if auth and auth.startswith("Bearer ") else None
        if user is None and (required or auth):
            raise HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, repo_id: str, rev: str = "main") -> tuple[Repo, Branch]:
        user = self._user(required=False)
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if rev not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo, repo.branches[rev]

    def _writable(self, repo_id: str, rev: str = "main") -> tuple[Repo, Branch]:
        user = self._user(required=True)
        repo, branch = self._readable(repo_id, rev)
        if repo_id.split("/")[0] != user:
            raise HttpError(403, f"You don't have the rights to write to {repo_id}")
        return repo, branch

    # --- Hub API -------------------------------------------------------------------------------

    def _whoami(self) -> None:
        user = self._user(required=True)
        self._send(200, {"type": "user", "name": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def _create_repo(self) -> None:
        user, payload = self._user(required=True), self._json()
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HttpError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        if payload.get("type") not in (None, "model"):
            raise HttpError(400, "this test server only hosts model repos")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
        repo = self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.branches["main"] = Branch()
        self.hub.commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": secrets.token_hex(12)})

    def _repo_info(self, repo: str, rev: str = "main") -> None:
        r, branch = self._readable(repo, rev)
        self._send(200, {"id": repo, "sha": branch.commits[-1]["oid"], "private": r.private, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(branch.files)]})

    def _create_branch(self, repo: str, branch: str) -> None:
        r, main = self._writable(repo)
        if branch in r.branches:
            raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
        r.branches[branch] = Branch(files=dict(main.files), commits=list(main.commits))
        shutil.copytree(self.hub.repo_dir(repo, "main"), self.hub.repo_dir(repo, branch))
        self._send(200, {})

    def _tree(self, repo: str, rev: str) -> None:
        if self.query.get("recursive") != ["true"]:
            raise HttpError(400, "this test server only lists trees recursively")
        files = self._readable(repo, rev)[1].files
        folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        out = [{"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0}
               for p in folders]
        self._send(200, out + [e.to_json(p) for p, e in sorted(files.items())])

    def _preupload(self, repo: str, rev: str) -> None:
        branch = self._writable(repo, rev)[1]
        files = []
        for f in self._json()["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= self.hub.lfs_threshold
            existing = branch.files.get(f["path"])
            # The oid huggingface_hub compares with its own: sha256 for LFS files, git sha1 otherwise.
            oid = (existing.sha256 or existing.blob_id) if existing else None
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": branch.commits[-1]["oid"]})

    def _commit(self, repo: str, rev: str) -> None:
        r, branch = self._writable(repo, rev)
        summary, changes = "", {}
        for line in filter(None, self.body.splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                if value.get("parentCommit") not in (None, branch.commits[-1]["oid"]):
                    raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                oid, stored = value["oid"], self.hub.lfs_dir(repo) / value["oid"]
                if not stored.is_file():
                    raise HttpError(422, f"LFS object {oid} for {value['path']} was never uploaded")
                size = stored.stat().st_size
                changes[value["path"]] = Entry(size=size, blob_id=git_blob_sha1(lfs_pointer(oid, size)), sha256=oid)
            else:
                raise HttpError(400, f"unsupported commit operation {key}")
        oid = self.hub.commit(r, rev, summary, changes)
        self._send(200, {"success": True, "commitOid": oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})

    def _xet_write_token(self, repo: str, rev: str) -> None:
        self._writable(repo, rev)
        raise HttpError(404, "Xet storage is not enabled on this server")  # what a Hub without Xet answers

    def _validate_yaml(self) -> None:
        content = self._json().get("content", "")
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content[3:content.find("\n---", 3)])
            except yaml.YAMLError as e:
                meta = f"invalid YAML: {e}"
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": f"bad metadata: {meta!r}"}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    # --- git-LFS -------------------------------------------------------------------------------

    def _lfs_batch(self, repo: str) -> None:
        self._writable(repo)
        payload = self._json()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HttpError(400, "only basic uploads are supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (self.hub.lfs_dir(repo) / oid).is_file():  # objects already stored need no upload
                href = f"{self.hub.url}/lfs-objects/{repo}/{oid}?sig={self.hub.sign(repo, oid)}&size={size}"
                entry["actions"] = {"upload": {"href": href, "header": {}},
                                    "verify": {"href": f"{self.hub.url}/lfs-verify/{repo}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, repo: str, oid: str) -> None:
        # A pre-signed URL, like S3's: authorised by its signature, never by the Hub token.
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self.hub.sign(repo, oid)):
            raise HttpError(403, "bad signature")
        if hashlib.sha256(self.body).hexdigest() != oid or str(len(self.body)) != self.query.get("size", [""])[0]:
            raise HttpError(400, "content does not match the announced oid and size")
        store = self.hub.lfs_dir(repo)
        store.mkdir(parents=True, exist_ok=True)
        tmp = store / f".{oid}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(self.body)
        tmp.replace(store / oid)
        self.hub.lfs_puts.append(oid)
        self._send(200, None, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _lfs_verify(self, repo: str) -> None:
        self._writable(repo)
        payload = self._json()
        path = self.hub.lfs_dir(repo) / payload["oid"]
        if not path.is_file() or path.stat().st_size != payload["size"]:
            raise HttpError(404, "object not found")
        self._send(200, {})
