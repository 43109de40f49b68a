"""A loopback stand-in for the Hugging Face Hub's `resolve` endpoint, for `huggingface_hub.hf_hub_download`.

It answers `HEAD`/`GET /{owner}/{name}/resolve/{revision}/{filename}` the way the Hub does, with the headers
huggingface_hub 2.x reads (`file_download.get_hf_file_metadata`, `utils._http.hf_raise_for_status`):

* a regular file: `200` with `ETag: "<git blob sha1>"`, `X-Repo-Commit` and `Content-Length`;
* an LFS file: `302` to a separate "CDN" server (another loopback port, so another origin) with
  `X-Linked-Etag: "<sha256>"`, `X-Linked-Size` and `X-Repo-Commit`; huggingface_hub reads the metadata from
  the redirect itself and fetches the CDN url without the `Authorization` header;
* an unknown repo: `401` + `X-Error-Code: RepoNotFound`; an unknown revision: `404` + `RevisionNotFound`;
  an unknown file: `404` + `EntryNotFound` (with `X-Repo-Commit`, which the client uses to cache the miss).

Both servers bind 127.0.0.1 only and record every request (method, path, headers) for the tests to check.
`truncate_downloads` simulates a connection lost mid-download. `loopback_env` is the environment of a child
process that must talk to such a server only; `hub_upload_server.py` answers uploads on the same plumbing.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

_RESOLVE = re.compile(r"^/(?P<owner>[^/]+)/(?P<name>[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha256>[0-9a-f]{64})$")


_DROPPED_ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "HUGGINGFACE_")
_DROPPED_ENV = {"TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "DISABLE_TELEMETRY", "XDG_CACHE_HOME"}
_PROXY_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def loopback_env(hf_home: Path, endpoint: str, *, offline: bool = False, token: str | None = None) -> dict[str, str]:
    """The environment of a child process whose huggingface_hub talks to `endpoint` (a 127.0.0.1 url) only.

    Every HF_*/proxy variable of the caller is dropped (no stored token: HF_HOME is `hf_home`), Xet is off so
    uploads use plain Git LFS, and progress bars, telemetry and update checks are off.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_DROPPED_ENV_PREFIXES) and key not in _DROPPED_ENV and key.lower() not in _PROXY_ENV
    }
    env.update(
        HF_HOME=str(hf_home),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def git_blob_sha1(content: bytes) -> str:
    """The id git gives a blob: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def commit_id(seed: str) -> str:
    """A deterministic 40-hex commit hash."""
    return hashlib.sha1(seed.encode()).hexdigest()


@dataclass
class HubRepo:
    """A model repo: one commit (also the head of `main`) holding `files`; `lfs` serves them through the CDN."""

    repo_id: str
    files: dict[str, bytes]
    commit: str
    lfs: bool = False

    def etag(self, filename: str) -> str:
        """The cache blob name huggingface_hub will use: sha256 for LFS files, git sha1 otherwise."""
        content = self.files[filename]
        return hashlib.sha256(content).hexdigest() if self.lfs else git_blob_sha1(content)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: which server, method, path, and headers (lower-cased names)."""

    server: str  # "hub", "cdn" or "storage"
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class RequestLog:
    """What every loopback server shares between its handler threads: the requests received, under a lock."""

    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    truncate_downloads: bool = False  # when set, a 200 answer to GET sends half its body and hangs up


@dataclass
class _State(RequestLog):
    repos: dict[str, HubRepo] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    cdn_url: str = ""


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing: read and record the request, then let the subclass pick status, headers and body
    (`respond`, which finds the request body in `self.body`)."""

    server_name_tag = ""
    state: RequestLog
    body: bytes = b""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        """Keep test output quiet."""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._handle(send_body=False)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle(send_body=True)

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        self._handle(send_body=True)

    def do_PUT(self) -> None:  # noqa: N802 - http.server naming
        self._handle(send_body=True)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, send_body: bool) -> None:
        self.body = self._read_body()
        with self.state.lock:
            self.state.requests.append(
                RecordedRequest(
                    server=self.server_name_tag,
                    method=self.command,
                    path=self.path,
                    headers={name.lower(): value for name, value in self.headers.items()},
                )
            )
        status, headers, body = self.respond()
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body and body and status == 200 and self.command == "GET" and self.state.truncate_downloads:
            # A connection lost mid-download: announce the full length, send half, hang up.
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif send_body:
            self.wfile.write(body)

    def respond(self) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


class _HubHandler(_Handler):
    server_name_tag = "hub"

    def respond(self) -> tuple[int, dict[str, str], bytes]:
        match = _RESOLVE.match(self.path.split("?", 1)[0])
        if match is None:
            return 404, {}, b"not a resolve url"
        repo_id = f"{unquote(match['owner'])}/{unquote(match['name'])}"
        revision, filename = unquote(match["revision"]), unquote(match["filename"])
        repo = self.state.repos.get(repo_id)
        if repo is None:
            # The Hub answers 401 for a missing repo (it cannot tell it from a private one).
            return _error(401, "RepoNotFound", "Repository not found")
        if revision not in ("main", repo.commit):
            return _error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        if filename not in repo.files:
            status, headers, body = _error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"")
            headers["X-Repo-Commit"] = repo.commit
            return status, headers, body
        content = repo.files[filename]
        if repo.lfs:
            sha256 = repo.etag(filename)
            headers = {
                "Location": f"{self.state.cdn_url}/blobs/{sha256}",
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(content)),
                "ETag": f'"{git_blob_sha1(content)}"',  # the pointer file's etag: the client must prefer X-Linked-Etag
            }
            return 302, headers, b""
        headers = {
            "ETag": f'"{repo.etag(filename)}"',
            "X-Repo-Commit": repo.commit,
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, content


class _CdnHandler(_Handler):
    server_name_tag = "cdn"

    def respond(self) -> tuple[int, dict[str, str], bytes]:
        match = _BLOB.match(self.path.split("?", 1)[0])
        content = self.state.blobs.get(match["sha256"]) if match else None
        if content is None:
            return 404, {}, b"no such blob"
        return 200, {"Content-Type": "application/octet-stream"}, content


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = ('{"error": "%s"}' % message.replace('"', "'")).encode()
    return status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, body


def _serve(handler: type[_Handler], state: RequestLog) -> tuple[ThreadingHTTPServer, threading.Thread]:
    bound = type(handler.__name__, (handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


class HubServer:
    """The fake Hub (`url`, use as `HF_ENDPOINT`) and its CDN, both on 127.0.0.1; a context manager."""

    def __init__(self) -> None:
        self._state = _State()
        self._hub, self._hub_thread = _serve(_HubHandler, self._state)
        self._cdn, self._cdn_thread = _serve(_CdnHandler, self._state)
        self._state.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    @property
    def url(self) -> str:
        """The Hub endpoint, e.g. `http://127.0.0.1:41234`."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The CDN origin LFS files redirect to."""
        return self._state.cdn_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in order."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def truncate_downloads(self) -> bool:
        """When set, every successful GET sends half its body and drops the connection."""
        return self._state.truncate_downloads

    @truncate_downloads.setter
    def truncate_downloads(self, value: bool) -> None:
        self._state.truncate_downloads = value

    def clear_requests(self) -> None:
        """Forget the requests recorded so far."""
        with self._state.lock:
            self._state.requests.clear()

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None, lfs: bool = False
    ) -> HubRepo:
        """Publish a repo whose `main` (and only commit) holds `files`."""
        repo = HubRepo(repo_id=repo_id, files=dict(files), commit=commit or commit_id(repo_id), lfs=lfs)
        with self._state.lock:
            self._state.repos[repo_id] = repo
            if lfs:
                for filename in repo.files:
                    self._state.blobs[repo.etag(filename)] = repo.files[filename]
        return repo

    def close(self) -> None:
        """Stop both servers and free their ports."""
        for server, thread in ((self._hub, self._hub_thread), (self._cdn, self._cdn_thread)):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
