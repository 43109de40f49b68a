"""A loopback stand-in for the Hugging Face Hub's upload endpoints, for huggingface_hub's `HfApi` with Xet off.

It answers what huggingface_hub 2.4 sends for `create_repo`, `repo_info`, `create_branch`, `ModelCard.validate`
and `preupload_lfs_files` + `create_commit` over plain Git LFS (`HF_HUB_DISABLE_XET=1`):

* `POST /api/repos/create` `{name, organization, visibility?}`: `{url}`; `409` (with `url`) when it exists, `403`
  outside the namespaces the token may write to (the client then asks `repo_info` whether it exists);
* `GET /api/models/{repo}[/revision/{rev}]`: `{id, private, sha}`; `401 RepoNotFound` for an unknown repo;
* `POST /api/models/{repo}/branch/{branch}`: a branch from main's head; `409` when it exists;
* `POST /api/validate-yaml` `{content, repoType}`: `400` with `errors` when the front matter is not a YAML mapping;
* `POST /api/models/{repo}/preupload/{rev}` `{files: [{path, sample, size}]}`: each file's `uploadMode` (`lfs`
  for the suffixes the repo's `.gitattributes` tracks, or past 10 MB) and the `oid` of a file already there;
* `POST /{repo}.git/info/lfs/objects/batch` `{objects: [{oid, size}]}`: per object an `upload` href on a
  separate storage server (another port, like S3: it refuses an `Authorization` header) and a `verify` href;
  no actions for an object already stored;
* `PUT {storage}/upload/{oid}`: stored only when its sha256 and size are the ones the batch promised;
* `POST /{repo}.git/info/lfs/objects/verify` `{oid, size}`: `404` unless that object is stored;
* `POST /api/models/{repo}/commit/{rev}` (ndjson: a header, then `file` entries in base64 and `lfsFile`
  pointers): a regular file must match the size and first bytes its preupload announced, an LFS pointer must
  name a stored object of that size; then one new commit `{commitOid, commitUrl}`.

and the reads that huggingface_hub's `hf_hub_download` and `snapshot_download` send for what was uploaded:

* `GET /api/models/{repo}/tree/{rev}` (`recursive`): every file of that commit, LFS ones with their `lfs` entry;
* `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a regular file with its git ETag and `X-Repo-Commit`, an LFS file
  as a `302` to `{storage}/blobs/{sha256}` with `X-Linked-Etag`/`X-Linked-Size` (hub_server.py explains these
  headers); `404 EntryNotFound` for a path the commit lacks. `rev` is a branch or any commit of one.

Writes and private repos need `Authorization: Bearer <token>` (`401` otherwise, as the Hub answers a bad token);
public repos read without one. `fail(route, status)` makes a route answer an error, after letting `skip`
requests through; `tamper(repo, path)` serves that file (from then on) with one byte flipped, as a corrupted
or tampered download, while every header still describes the original.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import yaml

from hub_server import RecordedRequest, RequestLog, _error, _Handler, _serve, commit_id, git_blob_sha1

# The patterns a new Hub repo's .gitattributes sends to LFS that a canary-convert folder can contain.
LFS_SUFFIXES = (".safetensors", ".model", ".nemo", ".bin")
LFS_SIZE = 10 * 1000 * 1000  # the Hub sends larger files to LFS whatever their name
_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, str, str, re.Pattern[str]]] = [
    (name, server, method, re.compile(pattern))
    for name, server, method, pattern in [
        ("create", "hub", "POST", r"^/api/repos/create$"),
        ("repo-info", "hub", "GET", rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"),
        ("branch", "hub", "POST", rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"),
        ("validate-yaml", "hub", "POST", r"^/api/validate-yaml$"),
        ("preupload", "hub", "POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"),
        ("commit", "hub", "POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"),
        ("lfs-batch", "hub", "POST", rf"^/{_REPO}\.git/info/lfs/objects/batch$"),
        ("lfs-verify", "hub", "POST", rf"^/{_REPO}\.git/info/lfs/objects/verify$"),
        ("storage-put", "storage", "PUT", r"^/upload/(?P<oid>[0-9a-f]{64})$"),
        ("tree", "hub", "GET", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)$"),
        ("resolve", "hub", "HEAD", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        ("resolve", "hub", "GET", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"),
        ("storage-get", "storage", "GET", r"^/blobs/(?P<oid>[0-9a-f]{64})$"),
    ]
]
# Routes that read a public repo without a token.
_READS = {"repo-info", "tree", "resolve"}


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_SIZE


@dataclass(frozen=True)
class Commit:
    """One commit: the whole tree after it, and which of its paths are LFS pointers."""

    oid: str
    summary: str
    description: str
    files: dict[str, bytes]
    lfs: frozenset[str]


@dataclass
class UploadedRepo:
    repo_id: str
    private: bool
    branches: dict[str, list[Commit]]  # each branch's history, head last

    def head(self, branch: str = "main") -> Commit:
        return self.branches[branch][-1]


@dataclass(frozen=True)
class Failure:
    route: str
    status: int
    code: str  # X-Error-Code, e.g. RepoNotFound
    message: str
    skip: int  # requests of this route let through before failing
    headers: dict[str, str]


@dataclass
class _UploadState(RequestLog):
    token: str = ""
    writable: set[str] = field(default_factory=set)  # namespaces the token may create repos in
    repos: dict[str, UploadedRepo] = field(default_factory=dict)
    promised: dict[str, int] = field(default_factory=dict)  # LFS oid -> size, from batch requests
    announced: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (repo, path) -> preupload entry
    blobs: dict[str, bytes] = field(default_factory=dict)  # stored LFS objects by sha256
    failures: list[Failure] = field(default_factory=list)
    tampered: set[str] = field(default_factory=set)  # sha256 of contents served with one byte flipped
    seen: dict[str, int] = field(default_factory=dict)  # requests per route
    hub_url: str = ""
    storage_url: str = ""


class _Refusal(Exception):
    """An error answer decided deep inside a route."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.answer = _error(status, code, message)


def _json(status: int, data: Any, content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": content_type}, json.dumps(data).encode()


class _UploadHandler(_Handler):
    state: _UploadState

    def respond(self) -> tuple[int, dict[str, str], bytes]:
        path = self.path.split("?", 1)[0]
        for name, server, method, pattern in _ROUTES:
            match = pattern.match(path)
            if server == self.server_name_tag and method == self.command and match:
                with self.state.lock:
                    try:
                        return self._route(name, {k: unquote(v) for k, v in match.groupdict().items() if v})
                    except _Refusal as refusal:
                        return refusal.answer
        return _error(404, "", f"no route for {self.command} {path}")

    def _route(self, name: str, args: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.state.seen[name] = self.state.seen.get(name, 0) + 1
        for failure in self.state.failures:
            if failure.route == name and self.state.seen[name] > failure.skip:
                status, headers, body = _error(failure.status, failure.code, failure.message)
                return status, {**headers, **failure.headers}, body
        if self.server_name_tag == "hub" and name != "validate-yaml" and not self._authorized():
            if "Authorization" in self.headers or name not in _READS:
                return _error(401, "", "Invalid credentials in Authorization header")
        return getattr(self, "_" + name.replace("-", "_"))(**args)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _readable(self, repo: str, rev: str) -> Commit:
        """The commit `rev` names (a branch's head, or any commit of a branch) in a repo the caller may read."""
        found = self.state.repos.get(repo)
        if found is None or (found.private and not self._authorized()):
            raise _Refusal(401, "RepoNotFound", "Repository not found")
        if rev in found.branches:
            return found.head(rev)
        for history in found.branches.values():
            for commit in history:
                if commit.oid == rev:
                    return commit
        raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _served(self, content: bytes) -> bytes:
        if hashlib.sha256(content).hexdigest() not in self.state.tampered:
            return content
        flipped = bytearray(content)
        flipped[len(flipped) // 2] ^= 0x01
        return bytes(flipped)

    def _payload(self) -> Any:
        return json.loads(self.body or b"{}")

    def _create(self) -> tuple[int, dict[str, str], bytes]:
        payload = self._payload()
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.state.repos:  # the Hub names the existing repo's url in its 409, and clients read it
            status, headers, _ = _error(409, "", "You already created this model repo")
            return status, headers, json.dumps({"error": "You already created this model repo",
                                                "url": f"{self.state.hub_url}/{repo_id}"}).encode()
        if payload["organization"] not in self.state.writable:
            return _error(403, "", f'You don\'t have the rights to create a model under the namespace "{payload["organization"]}"')
        _add_repo(self.state, repo_id, {}, private=payload.get("visibility") == "private")
        return _json(200, {"url": f"{self.state.hub_url}/{repo_id}", "name": repo_id, "id": commit_id(repo_id)})

    def _repo_info(self, repo: str, rev: str = "main") -> tuple[int, dict[str, str], bytes]:
        commit = self._readable(repo, rev)
        return _json(200, {"id": repo, "private": self.state.repos[repo].private, "sha": commit.oid})

    def _tree(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        commit = self._readable(repo, rev)
        entries = []
        for path, content in sorted(commit.files.items()):
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}
            if path in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return _json(200, entries)

    def _resolve(self, repo: str, rev: str, path: str) -> tuple[int, dict[str, str], bytes]:
        commit = self._readable(repo, rev)
        if path not in commit.files:
            status, headers, body = _error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"")
            return status, {**headers, "X-Repo-Commit": commit.oid}, body
        content = commit.files[path]
        if path in commit.lfs:
            sha256 = hashlib.sha256(content).hexdigest()
            return 302, {"Location": f"{self.state.storage_url}/blobs/{sha256}", "X-Repo-Commit": commit.oid,
                         "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content)),
                         "ETag": f'"{git_blob_sha1(content)}"'}, b""
        return 200, {"ETag": f'"{git_blob_sha1(content)}"', "X-Repo-Commit": commit.oid,
                     "Content-Type": "application/octet-stream"}, self._served(content)

    def _storage_get(self, oid: str) -> tuple[int, dict[str, str], bytes]:
        if oid not in self.state.blobs:
            return _error(404, "", "no such object")
        return 200, {"Content-Type": "application/octet-stream"}, self._served(self.state.blobs[oid])

    def _branch(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        found = self._writable(repo)
        if rev in found.branches:
            return _error(409, "", f"Reference already exists: refs/heads/{rev}")
        found.branches[rev] = [found.head()]
        return _json(200, {})

    def _validate_yaml(self) -> tuple[int, dict[str, str], bytes]:
        content = self._payload()["content"]
        front = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(front.group(1)) if front else None
        except yaml.YAMLError as exc:
            return _json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if not isinstance(metadata, dict):
            return _json(400, {"errors": [{"message": "the front matter is not a YAML mapping"}]})
        return _json(200, {"errors": [], "warnings": []})

    def _writable(self, repo: str, rev: str | None = None) -> UploadedRepo:
        found = self.state.repos.get(repo)
        if found is None:
            raise _Refusal(404, "RepoNotFound", "Repository not found")
        if repo.split("/")[0] not in self.state.writable:
            raise _Refusal(403, "", "You don't have write access to this repo")
        if rev is not None and rev not in found.branches:
            raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return found

    def _preupload(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        head = self._writable(repo, rev).head(rev)
        answers = []
        for entry in self._payload()["files"]:
            self.state.announced[(repo, entry["path"])] = entry
            answer = {"path": entry["path"], "uploadMode": "lfs" if is_lfs(entry["path"], entry["size"]) else "regular",
                      "shouldIgnore": False}
            if entry["path"] in head.files:
                content = head.files[entry["path"]]
                answer["oid"] = hashlib.sha256(content).hexdigest() if entry["path"] in head.lfs else git_blob_sha1(content)
            answers.append(answer)
        return _json(200, {"files": answers})

    def _lfs_batch(self, repo: str) -> tuple[int, dict[str, str], bytes]:
        payload = self._payload()
        self._writable(repo, payload.get("ref", {}).get("name", "main"))
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], item["size"]
            if self._is_stored(oid, size):
                objects.append({"oid": oid, "size": size})
                continue
            self.state.promised[oid] = size
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.state.storage_url}/upload/{oid}"},
                "verify": {"href": f"{self.state.hub_url}/{repo}.git/info/lfs/objects/verify"},
            }})
        return _json(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _storage_put(self, oid: str) -> tuple[int, dict[str, str], bytes]:
        if "Authorization" in self.headers:
            return _error(400, "", "Only one auth mechanism allowed")
        if oid not in self.state.promised:
            return _error(403, "", "no upload was granted for this object")
        if len(self.body) != self.state.promised[oid] or hashlib.sha256(self.body).hexdigest() != oid:
            return _error(400, "", "the object's sha256 or size differs from the one promised")
        self.state.blobs[oid] = self.body
        return 200, {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}, b""

    def _is_stored(self, oid: str, size: int) -> bool:
        return oid in self.state.blobs and len(self.state.blobs[oid]) == size

    def _lfs_verify(self, repo: str) -> tuple[int, dict[str, str], bytes]:
        payload = self._payload()
        if not self._is_stored(payload["oid"], payload["size"]):
            return _error(404, "", f"object {payload['oid']} is not stored")
        return _json(200, {})

    def _commit(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        found = self._writable(repo, rev)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        head = found.head(rev)
        files, lfs = dict(head.files), set(head.lfs)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                content = base64.b64decode(value["content"])
                announced = self.state.announced.get((repo, value["path"]))
                if announced is None or announced["size"] != len(content) or \
                        base64.b64decode(announced["sample"]) != content[:512]:
                    return _error(400, "", f"{value['path']}: differs from what its preupload announced")
                files[value["path"]] = content
                lfs.discard(value["path"])
            elif line["key"] == "lfsFile":
                if not self._is_stored(value["oid"], value["size"]):
                    return _error(422, "", f"{value['path']}: LFS object {value['oid']} is not in storage")
                files[value["path"]] = self.state.blobs[value["oid"]]
                lfs.add(value["path"])
            elif line["key"] != "header":
                return _error(400, "", f"unexpected commit entry {line['key']}")
        seed = f"{repo}@{rev}#{len(found.branches[rev])}:{header['summary']}"
        commit = Commit(commit_id(seed), header["summary"], header.get("description", ""), files, frozenset(lfs))
        found.branches[rev].append(commit)
        return _json(200, {"success": True, "commitOid": commit.oid,
                           "commitUrl": f"{self.state.hub_url}/{repo}/commit/{commit.oid}"})


class _HubUploadHandler(_UploadHandler):
    server_name_tag = "hub"


class _StorageHandler(_UploadHandler):
    server_name_tag = "storage"


def _gitattributes() -> bytes:
    return "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def _stored_lfs(state: _UploadState, files: dict[str, bytes]) -> frozenset[str]:
    """The paths of `files` the Hub keeps in LFS, their contents put in storage."""
    lfs = frozenset(path for path, content in files.items() if is_lfs(path, len(content)))
    for path in lfs:
        state.blobs[hashlib.sha256(files[path]).hexdigest()] = files[path]
    return lfs


def _add_repo(state: _UploadState, repo_id: str, files: dict[str, bytes], *, private: bool) -> UploadedRepo:
    """A repo as the Hub creates it: an initial commit with .gitattributes, plus `files` when given."""
    tree = {".gitattributes": _gitattributes(), **files}
    initial = Commit(commit_id(f"{repo_id}:initial"), "initial commit", "", tree, _stored_lfs(state, files))
    repo = UploadedRepo(repo_id=repo_id, private=private, branches={"main": [initial]})
    state.repos[repo_id] = repo
    return repo


class HubUploadServer:
    """The fake Hub (`url`, use as `HF_ENDPOINT`) and its LFS storage, both on 127.0.0.1; a context manager."""

    def __init__(self, token: str, writable: Iterable[str]) -> None:
        self._state = _UploadState(token=token, writable=set(writable))
        self._hub, self._hub_thread = _serve(_HubUploadHandler, self._state)
        self._storage, self._storage_thread = _serve(_StorageHandler, self._state)
        self._state.hub_url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self._state.storage_url = f"http://127.0.0.1:{self._storage.server_address[1]}"

    @property
    def url(self) -> str:
        return self._state.hub_url

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def stored(self) -> dict[str, bytes]:
        """The LFS objects in storage, by sha256 (committed or not)."""
        with self._state.lock:
            return dict(self._state.blobs)

    def repo(self, repo_id: str) -> UploadedRepo:
        with self._state.lock:
            return self._state.repos[repo_id]

    def has_repo(self, repo_id: str) -> bool:
        with self._state.lock:
            return repo_id in self._state.repos

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> UploadedRepo:
        """A repo that exists before the upload (created by someone, holding `files` on main)."""
        with self._state.lock:
            return _add_repo(self._state, repo_id, files, private=private)

    def fail(self, route: str, status: int, message: str = "Internal Error", *, code: str = "", skip: int = 0,
             headers: dict[str, str] | None = None) -> None:
        """From now on answer `route` (see _ROUTES) with `status`, after letting `skip` requests through."""
        assert route in {name for name, *_ in _ROUTES}, route
        with self._state.lock:
            self._state.failures.append(Failure(route, status, code, message, skip, dict(headers or {})))

    def push(self, repo_id: str, files: dict[str, bytes], summary: str = "pushed from elsewhere") -> Commit:
        """A new commit on main adding (or replacing) `files`, as a push by other means than upload would."""
        with self._state.lock:
            repo = self._state.repos[repo_id]
            head = repo.head()
            lfs = (head.lfs - files.keys()) | _stored_lfs(self._state, files)
            commit = Commit(commit_id(f"{repo_id}@main#{len(repo.branches['main'])}:{summary}"), summary, "",
                            {**head.files, **files}, lfs)
            repo.branches["main"].append(commit)
            return commit

    def tamper(self, repo_id: str, path: str) -> None:
        """Serve `path` of the repo's main head with one byte flipped (its headers unchanged) from now on."""
        with self._state.lock:
            content = self._state.repos[repo_id].head().files[path]
            self._state.tampered.add(hashlib.sha256(content).hexdigest())

    def recover(self) -> None:
        """Answer every route normally again."""
        with self._state.lock:
            self._state.failures.clear()

    def close(self) -> None:
        for server, thread in ((self._hub, self._hub_thread), (self._storage, self._storage_thread)):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def __enter__(self) -> HubUploadServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
