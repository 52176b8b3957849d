"""A stand-in for the Hugging Face Hub, served on 127.0.0.1 by the test itself (``HF_ENDPOINT`` points at it).

It serves what huggingface_hub's downloads use (read from its source, 0.36 and 2.x), with the headers they
expect:

- ``GET /api/models/{repo}[/revision/{rev}]``: the repository's commit (``sha``) and files (``siblings``,
  with sizes and LFS info), as ``HfApi.model_info`` reads them;
- ``GET /api/models/{repo}/tree/{rev}``: the recursive listing ``snapshot_download`` (``hf download``) reads;
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: small files answered directly (``ETag`` = git blob id,
  ``X-Repo-Commit``, ``Content-Length``); large ("LFS") files answered with a 302 to a second server standing
  in for the CDN (``X-Linked-Etag`` = sha256, ``X-Linked-Size``, ``Location``), which the client does not
  follow with its token. Both honour ``Range`` (206 + ``Content-Range``), which resumed downloads send;
- the Hub's errors: ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound (404) and GatedRepo
  (401 without the repository's token).

Faults for tests: ``cut_once[path] = n`` closes the connection after n body bytes on the next GET of path;
``hold[path] = n`` sends n bytes, sets ``held``, and waits for ``release`` before closing.
Every request is recorded in ``requests`` as (server, method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from waiting import CEILING_S  # only a hung test waits this long for release

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
CHILD_GUARD = os.path.join(TESTS, "child_guard")
LFS_THRESHOLD = 10_000  # bytes; larger files are served through the CDN stand-in, as the Hub does with LFS files


def child_env(tmp_path, endpoint: str, pythonpath: Optional[List[str]] = None, **extra: str) -> Dict[str, str]:
    """The environment of a child process that talks to the stand-in at ``endpoint``: this process's, minus
    every HF_ variable (the suite's offline switches included), with its own HF_HOME under ``tmp_path``, and
    the loopback-only guard (tests/child_guard) plus ``pythonpath`` (default: the repository) on PYTHONPATH.
    huggingface_hub reads these once, at import: a child started with them is the reliable way to set them."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_HOME=os.path.join(str(tmp_path), "hf"),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        PYTHONPATH=os.pathsep.join([CHILD_GUARD, *(pythonpath if pythonpath is not None else [REPO])]),
    )
    env.update(extra)
    return env


def folder_files(folder: str) -> Dict[str, bytes]:
    """Every file under ``folder`` by repository path (forward slashes): a model saved to disk, to serve."""
    files = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                files[os.path.relpath(path, folder).replace(os.sep, "/")] = fh.read()
    return files


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StandinRepo:
    repo_id: str
    files: Dict[str, bytes]
    gated_token: Optional[str] = None  # gated: file downloads need "Authorization: Bearer <token>"
    branches: Tuple[str, ...] = ("main",)
    commit: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        self.commit = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) > LFS_THRESHOLD

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def resolve(self, revision: str) -> Optional[str]:
        return self.commit if revision in self.branches or revision == self.commit else None


class StandinHub:
    """``with StandinHub() as hub: hub.add(...); env = {"HF_ENDPOINT": hub.url, ...}``."""

    def __init__(self) -> None:
        self.repos: Dict[str, StandinRepo] = {}
        self.requests: List[Tuple[str, str, str, Dict[str, str]]] = []
        self.cut_once: Dict[str, int] = {}
        self.hold: Dict[str, int] = {}
        self.held = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._servers: List[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    def add(self, repo_id: str, files: Dict[str, bytes], **kwargs) -> StandinRepo:
        repo = StandinRepo(repo_id, dict(files), **kwargs)
        self.repos[repo_id] = repo
        return repo

    def requested(self, method: Optional[str] = None) -> List[str]:
        """Paths requested so far (optionally of one method), in order."""
        with self._lock:
            return [path for _, m, path, _ in self.requests if method is None or m == method]

    def downloaded(self) -> List[str]:
        """Repository paths whose content was sent (GET on resolve for small files, on the CDN for LFS)."""
        names = []
        for server, method, path, _ in list(self.requests):
            if method != "GET":
                continue
            if server == "cdn":
                names.append(parse_qs(urlsplit(path).query)["file"][0])
            else:
                match = _RESOLVE.match(urlsplit(path).path)
                if match:
                    names.append(unquote(match.group("path")))
        return names

    def __enter__(self) -> "StandinHub":
        hub_server = _server(self, "hub")
        cdn_server = _server(self, "cdn")
        self._servers = [hub_server, cdn_server]
        self.url = f"http://127.0.0.1:{hub_server.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __exit__(self, *exc) -> None:
        self.stop()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _server(hub: StandinHub, role: str) -> ThreadingHTTPServer:
    handler = type(f"{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with Content-Length, as the real Hub
    hub: StandinHub
    role: str

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- dispatch ------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        with self.hub._lock:
            self.hub.requests.append((self.role, self.command, self.path, dict(self.headers)))
        parts = urlsplit(self.path)
        if self.role == "cdn":
            return self._cdn(parts, body)
        for pattern, method in ((_TREE, self._tree), (_API, self._info), (_RESOLVE, self._resolve)):
            match = pattern.match(parts.path)
            if match:
                return method(match, body)
        self._error(404, "NotFound", "no such endpoint in the stand-in")

    # --- helpers -------------------------------------------------------------------------------------------
    def _send(self, status: int, headers: Dict[str, str], payload: bytes = b"", body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def _json(self, data) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str, extra: Optional[Dict[str, str]] = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _repo(self, match) -> Optional[StandinRepo]:
        repo = self.hub.repos.get(unquote(match.group("repo")))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: StandinRepo, match) -> Optional[str]:
        revision = unquote(match.group("rev") or "main")
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # --- endpoints -----------------------------------------------------------------------------------------
    def _info(self, match, body: bool) -> None:
        repo = self._repo(match)
        if repo is None or self._commit(repo, match) is None:
            return
        siblings = []
        for path, data in sorted(repo.files.items()):
            entry = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if repo.is_lfs(path):
                entry["lfs"] = {"sha256": repo.sha256(path), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        self._json(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": siblings,
            }
        )

    def _tree(self, match, body: bool) -> None:
        repo = self._repo(match)
        if repo is None or self._commit(repo, match) is None:
            return
        entries, folders = [], set()
        for path, data in sorted(repo.files.items()):
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if repo.is_lfs(path):
                entry["lfs"] = {"oid": repo.sha256(path), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, match, body: bool) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        commit = self._commit(repo, match)
        if commit is None:
            return
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
            )
            return
        path = unquote(match.group("path"))
        if path not in repo.files:
            self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
            return
        data = repo.files[path]
        if repo.is_lfs(path):
            location = f"{self.hub.cdn_url}/cdn/{repo.sha256(path)}?file={path}&repo={repo.repo_id}"
            self._send(
                302,
                {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{repo.sha256(path)}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(data)}"',
                },
                body=False,
            )
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        self._content(path, data, headers, body)

    def _cdn(self, parts, body: bool) -> None:
        query = parse_qs(parts.query)
        repo = self.hub.repos.get(query.get("repo", [""])[0])
        path = query.get("file", [""])[0]
        if repo is None or path not in repo.files:
            self._send(404, {}, b"not found", body)
            return
        name = path.rsplit("/", 1)[-1]  # the real CDN names the file, which the client's progress bar shows
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{repo.sha256(path)}"',
            "Content-Disposition": f"attachment; filename*=UTF-8''{name}; filename=\"{name}\";",
        }
        self._content(path, repo.files[path], headers, body)

    def _content(self, path: str, full: bytes, headers: Dict[str, str], body: bool) -> None:
        start, status, data = 0, 200, full
        requested = self.headers.get("Range")
        if requested:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(full) - 1
                data = full[start : end + 1]
                status = 206
                headers = dict(headers, **{"Content-Range": f"bytes {start}-{end}/{len(full)}"})
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        cut = self.hub.cut_once.pop(path, None) if start == 0 else None
        hold = self.hub.hold.pop(path, None) if start == 0 else None
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if hold is not None:
            self.wfile.write(data[:hold])
            self.wfile.flush()
            self.hub.held.set()
            self.hub.release.wait(CEILING_S)
            self.close_connection = True
            return
        self.wfile.write(data)
