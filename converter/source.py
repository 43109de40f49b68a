"""Resolve SOURCE (a Hugging Face repo id, a `.nemo` file or an extracted folder) to a local path.

Hub downloads go through huggingface_hub, so its cache, `HF_HUB_OFFLINE`, `HF_TOKEN` and `HF_ENDPOINT`
behave as users of the Hub expect.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import httpx2  # huggingface_hub 2.x's transport; a connection lost mid-download surfaces as its error
from huggingface_hub import (
    ModelCard,
    cached_assets_path,
    get_cached_repo_tree,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import HubFileMissingError, HubUnreachableError, ModelFolderError, SourceError, UsageError
from .manifest import CONVERSION_FILE, FileRecord, manifest_problems, read_record, recorded_manifest

CARD_NAME = "README.md"  # a Hub repo's model card
# A speech-LLM repo (NeMo speechlm2, e.g. nvidia/canary-qwen-2.5b): SALM's config and safetensors, no .nemo.
SPEECH_LLM_CONFIG = "config.json"
SPEECH_LLM_WEIGHTS = "model.safetensors"
SPEECH_LLM_INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    """Where the checkpoint is on disk, and where it came from (for `conversion.json`)."""

    kind: Literal["hub", "file", "folder"]
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as asked for
    commit: str | None = None  # the commit the Hub cache resolved it to

    def provenance(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "path": str(self.path)}
        if self.kind == "hub":
            record.update(id=self.repo_id, revision=self.revision or "main", commit=self.commit)
        return record


def hub_filename(repo_id: str) -> str:
    """NVIDIA publishes each Canary checkpoint as `<repo name>.nemo` (nvidia/canary-1b -> canary-1b.nemo)."""
    return repo_id.split("/", 1)[1] + ".nemo"


def resolve_source(source: str, revision: str | None = None, tqdm_class: Any = None) -> ResolvedSource:
    """A local path wins; otherwise a `owner/name` string is fetched from the Hub (or its cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource(kind="folder", path=path)
    if path.is_file():
        return ResolvedSource(kind="file", path=path)
    if not _REPO_ID.match(source) or source.endswith(".nemo"):
        raise SourceError(f"{source}: no such file or folder (and not a Hugging Face repo id like nvidia/canary-1b)")
    return _download(source, revision, tqdm_class)


@dataclass(frozen=True)
class _HubRequest:
    """What is being fetched, for the error messages: `where` names it, `instead` says how to do without."""

    repo_id: str
    revision: str | None
    what: str  # "the file" or "the repo"
    instead: str
    filename: str | None = None

    @property
    def where(self) -> str:
        named = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return named + (f"@{self.revision}" if self.revision else "")


@contextmanager
def _hub_errors(request: _HubRequest) -> Iterator[None]:
    """huggingface_hub's failures as our SourceErrors, each naming the repo (and revision) at fault."""
    where = request.where
    try:
        yield
    except LocalEntryNotFoundError:
        raise HubUnreachableError(
            f"{where}: the Hugging Face Hub cannot be reached (or HF_HUB_OFFLINE is set) and {request.what} is not "
            f"in the local cache; {request.instead}"
        ) from None
    except GatedRepoError:
        raise SourceError(f"{where}: the repo is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{where}: no such repo on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: the repo has no revision {request.revision!r}") from None
    except EntryNotFoundError:
        raise HubFileMissingError(f"{where}: the repo has no file {request.filename}") from None
    except HfHubHTTPError as exc:
        raise SourceError(f"{where}: the Hub refused the download: {exc}") from None
    except HFValidationError as exc:
        raise SourceError(f"{request.repo_id}: not a valid Hugging Face repo id ({exc})") from None
    except httpx2.HTTPError as exc:
        raise HubUnreachableError(f"{where}: the download from the Hub failed ({exc}); retry, or {request.instead}") from None
    except OSError as exc:
        raise SourceError(f"{where}: cannot store the download: {exc}") from None


def _download(repo_id: str, revision: str | None, tqdm_class: Any) -> ResolvedSource:
    """A Hub repo's checkpoint: `<name>.nemo`, or a speech-LLM's folder (config.json + safetensors, as
    nvidia/canary-qwen-2.5b holds it), taken from the cache first when its config.json is cached."""
    with _hub_errors(_HubRequest(repo_id, revision, "the file", "", SPEECH_LLM_CONFIG)):  # a malformed id
        cached = try_to_load_from_cache(repo_id, SPEECH_LLM_CONFIG, revision=revision)
    if isinstance(cached, str) and _is_speech_llm_config(Path(cached)):
        return _download_speech_llm(repo_id, revision, tqdm_class)
    filename = hub_filename(repo_id)
    request = _HubRequest(repo_id, revision, "the file",
                          f"download {filename} elsewhere and pass its path: canary-convert ./{filename} OUT (for a "
                          "speech-LLM such as canary-qwen, its folder of config.json and model.safetensors)", filename)
    try:
        with _hub_errors(request):
            local = _hub_download(repo_id, filename, revision, tqdm_class)
    except HubFileMissingError:
        with _hub_errors(_HubRequest(repo_id, revision, "the file", request.instead, SPEECH_LLM_CONFIG)):
            try:
                config = _hub_download(repo_id, SPEECH_LLM_CONFIG, revision, tqdm_class)
            except EntryNotFoundError:
                config = None
        if config is None or not _is_speech_llm_config(config):
            raise
        return _download_speech_llm(repo_id, revision, tqdm_class)
    return _resolved_hub(local, repo_id, revision)


def _resolved_hub(local: Path, repo_id: str, revision: str | None) -> ResolvedSource:
    # The cache keeps files at .../snapshots/<commit>/<filename>.
    commit = local.parent.name if local.parent.parent.name == "snapshots" else None
    return ResolvedSource(kind="hub", path=local, repo_id=repo_id, revision=revision, commit=commit)


def _is_speech_llm_config(path: Path) -> bool:
    """Whether a repo's config.json is NeMo speechlm2 SALM's (it names `pretrained_llm` and `perception`)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "pretrained_llm" in config and "perception" in config


def _download_speech_llm(repo_id: str, revision: str | None, tqdm_class: Any) -> ResolvedSource:
    """The speech-LLM repo's config.json and weights (one file, or an index and its shards), as a folder of
    the cache's snapshot."""
    instead = "download the repo elsewhere and pass its folder: canary-convert ./FOLDER OUT"
    with _hub_errors(_HubRequest(repo_id, revision, "the file", instead, SPEECH_LLM_CONFIG)):
        config = _hub_download(repo_id, SPEECH_LLM_CONFIG, revision, tqdm_class)
    names = [SPEECH_LLM_WEIGHTS]
    with _hub_errors(_HubRequest(repo_id, revision, "the file", instead, SPEECH_LLM_INDEX)):
        try:
            index = _hub_download(repo_id, SPEECH_LLM_INDEX, revision, tqdm_class)
        except EntryNotFoundError:
            index = None
    if index is not None:
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{repo_id}/{SPEECH_LLM_INDEX}: not a safetensors index: {exc}") from None
    for name in names:
        with _hub_errors(_HubRequest(repo_id, revision, "the file", instead, name)):
            _hub_download(repo_id, name, revision, tqdm_class)
    resolved = _resolved_hub(config, repo_id, revision)
    return ResolvedSource(kind="hub", path=config.parent, repo_id=repo_id, revision=revision, commit=resolved.commit)


def _hub_download(repo_id: str, filename: str, revision: str | None, tqdm_class: Any = None) -> Path:
    """`hf_hub_download`, except that a file the cache lacks is first asked for once, without retries.

    When its first HEAD fails and nothing is cached, huggingface_hub 2.4 asks again with retries: 1+2+4+8+8 s
    of backoff (each attempt may wait 60 s), about 23 s before it gives up on a refused connection or an
    unknown host. A Hub that answers at all, even with an error, is reachable: hf_hub_download then reports
    that answer (or retries a 5xx) as usual. A cached file needs no probe: huggingface_hub falls back to it
    at once. An unreachable Hub raises what hf_hub_download raises then, LocalEntryNotFoundError.
    """
    if not isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
        except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled) as exc:
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached and the Hub cannot be reached: {exc}") from None
        except HfHubHTTPError:
            pass
    return Path(hf_hub_download(repo_id, filename, revision=revision, tqdm_class=tqdm_class))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def source_card_licence(source: ResolvedSource) -> str | None:
    """The `license` of a Hub source's own model card, when the card can be had (cache or Hub); else None.

    Best effort by design: the card is a courtesy for the converted model's card, never a reason to fail.
    """
    if source.kind != "hub" or source.repo_id is None:
        return None
    try:
        card = ModelCard.load(_hub_download(source.repo_id, CARD_NAME, source.commit or source.revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError, ValueError):
        return None
    licence = card.data.get("license")
    return str(licence) if licence else None


def resolve_folder(target: str | PathLike[str], revision: str | None = None, tqdm_class: Any = None) -> Path:
    """A converted MLX folder: a local path as is; a Hub repo id through huggingface_hub's cache.

    From the Hub, `conversion.json` comes first, then exactly the files its manifest lists (nothing else of the
    repo), all at the commit that `conversion.json` came from; each is checked against the manifest's size and
    sha256 before it is used, so a corrupted or tampered download is an error naming the file.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UsageError(f"{target}: a local folder has no revision (--revision {revision} is for a Hub repo id)")
        return path
    target = str(target)
    if not _REPO_ID.match(target):
        raise SourceError(f"{target}: no such folder (and not a Hugging Face repo id like mlx-community/name)")
    instead = "download the repo elsewhere and pass its folder"
    with _hub_errors(_HubRequest(target, revision, "the repo", instead)):
        at = f"@{revision}" if revision else ""
        try:
            record_path = _hub_download(target, CONVERSION_FILE, revision, tqdm_class)
        except RemoteEntryNotFoundError:
            raise ModelFolderError(f"{target}{at}: not a canary-convert folder (the repo has no {CONVERSION_FILE})") from None
        except RepositoryNotFoundError as exc:
            if isinstance(exc, GatedRepoError):
                raise
            raise SourceError(f"{target}{at}: no such local folder, and no such repo on the Hub (or it is private: "
                              "set HF_TOKEN)") from None
    snapshot = record_path.parent  # the cache keeps files at .../snapshots/<commit>/<filename>
    commit = snapshot.name
    where = f"{target}@{commit[:12]}"
    try:  # the manifest's names are checked to stay inside the folder before anything else is fetched
        manifest = recorded_manifest(snapshot, read_record(snapshot))
    except ModelFolderError as exc:
        raise ModelFolderError(str(exc).replace(str(snapshot), where, 1)) from None
    with _hub_errors(_HubRequest(target, commit, "the model", instead)):
        fetched = Path(snapshot_download(target, revision=commit, allow_patterns=[_exact(name) for name in manifest],
                                         tqdm_class=tqdm_class))
    checked = CheckedFiles(target)
    unchecked = {name: record for name, record in manifest.items() if not checked.holds(fetched / name, record)}
    if problems := manifest_problems(fetched, unchecked, added=False):
        name = problems[0].split(":", 1)[0]
        if not (fetched / name).is_file():
            raise HubUnreachableError(f"{where}: {name} is not in the local cache, and the Hub did not give it "
                                      f"(unreachable, or the repo lacks a file its {CONVERSION_FILE} lists)")
        raise ModelFolderError(f"{where}: {problems[0]}: the download is not the converted file; delete "
                               f"{fetched / name} (a link into the Hugging Face cache) and its blob, and fetch it again")
    for name, record in unchecked.items():
        checked.add(fetched / name, record)
    return fetched


class CheckedFiles:
    """The files of a Hub repo's cache already hashed and found as the manifest records them, so that each is
    hashed once, when fetched, not at every load. One small record per sha256 in huggingface_hub's assets
    cache (`$HF_HOME/assets/canary-convert/<repo>/checked/`): the blob's real path, size, mtime and inode when
    it was hashed; a file changed since (any of them) is hashed again. A cache that cannot be written only
    costs the hash at the next load."""

    def __init__(self, repo_id: str):
        self._repo_id = repo_id

    def _record_path(self, record: FileRecord) -> Path:
        folder = cached_assets_path(library_name="canary-convert", namespace=self._repo_id, subfolder="checked")
        return Path(folder) / record.sha256.removeprefix("sha256:")

    @staticmethod
    def _state(path: Path) -> dict[str, Any]:
        blob = path.resolve(strict=True)
        info = blob.stat()
        return {"blob": str(blob), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}

    def holds(self, path: Path, record: FileRecord) -> bool:
        try:
            state = self._state(path)
            return state["size"] == record.size and json.loads(self._record_path(record).read_text()) == state
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a loop of links
            return False

    def add(self, path: Path, record: FileRecord) -> None:
        try:
            target = self._record_path(record)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            partial.write_text(json.dumps(self._state(path)))
            os.replace(partial, target)
        except (OSError, ValueError, RuntimeError):
            pass


def repo_files(target: str | PathLike[str], folder: Path) -> list[str] | None:
    """Every file of the Hub repo that `resolve_folder(target)` fetched `folder` from, at its commit, from the
    listing snapshot_download keeps in the cache (no request); None for a local folder, or where the cache
    holds no listing (filled by hand, or by an older download)."""
    if Path(target).expanduser().is_dir():
        return None
    try:
        return [entry.path for entry in get_cached_repo_tree(str(target), revision=folder.name)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _exact(name: str) -> str:
    """An fnmatch pattern (what snapshot_download's allow_patterns are) that matches `name` only."""
    return re.sub(r"([*?\[])", r"[\1]", name)


_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


def hub_cache_sha256(path: Path) -> str | None:
    """The sha256 the Hub cache already knows: it stores an LFS file as blobs/<its sha256> (a regular git
    file's blob is named by its 40-hex git hash instead, which is no sha256)."""
    blob = path.resolve()
    if blob.parent.name == "blobs" and _SHA256_NAME.match(blob.name):
        return "sha256:" + blob.name
    return None


class SourceDigest:
    """The source's sha256 for conversion.json, off the conversion's critical path: the Hub cache's own when
    it has one, else computed on a thread while the conversion runs (hashlib releases the GIL)."""

    def __init__(self, path: Path):
        self._value = hub_cache_sha256(path)
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        if self._value is None:
            # A daemon: a failed conversion exits without waiting for the hash it no longer needs.
            self._thread = threading.Thread(target=self._compute, args=(path,), name="source-sha256", daemon=True)
            self._thread.start()

    def _compute(self, path: Path) -> None:
        try:
            self._value = sha256_of(path)
        except OSError as exc:
            self._error = exc

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise SourceError(f"{self._error.filename}: cannot read it to hash it: {self._error.strerror}")
        assert self._value is not None
        return self._value
