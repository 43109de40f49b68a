"""Publish a converted MLX folder to the Hugging Face Hub, exactly as its manifest lists it, in one commit.

Nothing is sent unless the folder is fit to publish: `conversion.json` readable, validation (and parity,
when it ran) passed, every file unchanged since the conversion, and a model card that names a licence.

Large files travel the way huggingface_hub 2.x sends them by default: over Xet when `hf_xet` is installed
(a dependency of huggingface_hub on x86_64 and arm64), over plain Git LFS when it is not or when
`HF_HUB_DISABLE_XET=1`. The Hub accepts both; Xet is what it recommends for new repos. Each file is sent to
storage on its own (`preupload_lfs_files`) before the single commit, so a failure can name the files that
reached storage; until the commit lands the repo's files stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub 2.x's transport: connection failures surface as its errors
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils._runtime import is_xet_available  # what huggingface_hub's own upload path consults

from . import __version__
from .errors import ModelFolderError, UploadError, UploadRefusedError, UsageError
from .card import CARD_FILE, UNKNOWN_LICENCE
from .manifest import CONVERSION_FILE, FileRecord, manifest_problems, read_record, recorded_manifest

UNKNOWN_LICENCES = ("", UNKNOWN_LICENCE)
LOGIN_HINT = "set HF_TOKEN to a token with write access, or run `hf auth login`"


@dataclass(frozen=True)
class UploadOptions:
    repo_id: str  # ORG/NAME
    private: bool = False  # create the repo private; refuse an existing public one
    revision: str | None = None  # a branch, created from main when absent; None commits to main

    def __post_init__(self) -> None:
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as exc:
            raise UsageError(f"{self.repo_id!r}: not a Hugging Face repo id ({exc})") from None
        if "/" not in self.repo_id:
            raise UsageError(f"{self.repo_id!r}: give the owner too, as ORG/NAME (e.g. mlx-community/{self.repo_id})")

    @property
    def target(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class PublishableFolder:
    """A folder that passed every check: its manifest, its conversion record and its model card."""

    folder: Path
    manifest: dict[str, FileRecord]
    record: dict[str, Any]
    card: ModelCard

    @property
    def licence(self) -> str:
        return str(self.card.data.license)

    @property
    def files(self) -> list[str]:
        """What one upload commits: every manifest file, then conversion.json."""
        return [*self.manifest, CONVERSION_FILE]


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    files: list[str]
    transport: str  # "Xet" or "Git LFS"


def _refuse(folder: Path, problem: str) -> UploadRefusedError:
    return UploadRefusedError(f"{folder}: {problem}; nothing was uploaded")


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        return read_record(folder)
    except ModelFolderError as exc:
        raise UploadRefusedError(f"{exc}: only a folder written by canary-convert can be uploaded; "
                                 "nothing was uploaded") from None


def _passed(check: Any) -> bool:
    return isinstance(check, dict) and check.get("passed") is True


def _check_results(folder: Path, record: Mapping[str, Any]) -> None:
    """Validation always runs (strict load, exact round trip); parity only with --parity."""
    if not _passed(record.get("validation")):
        raise _refuse(folder, f"{CONVERSION_FILE} does not record a passed validation (strict load, exact round trip)")
    if record.get("parity") is not None and not _passed(record["parity"]):
        raise _refuse(folder, f"{CONVERSION_FILE} records a parity check with NeMo that did not pass")


def _read_manifest(folder: Path, record: dict[str, Any]) -> dict[str, FileRecord]:
    try:
        manifest = recorded_manifest(folder, record)
    except ModelFolderError as exc:
        raise UploadRefusedError(f"{exc}; nothing was uploaded") from None
    problems = manifest_problems(folder, manifest)
    if problems:
        raise _refuse(folder, "changed since the conversion: " + "; ".join(problems) + "; convert again")
    return manifest


def _read_card(folder: Path, manifest: Mapping[str, FileRecord]) -> ModelCard:
    """The Hub shows the card's `license`; publishing a model under an unknown licence is never silent."""
    if CARD_FILE not in manifest:
        raise _refuse(folder, f"no model card ({CARD_FILE}) in the conversion: convert again with this canary-convert")
    try:
        card = ModelCard((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise _refuse(folder, f"{CARD_FILE}: unreadable model card front matter ({exc})") from None
    licence = card.data.license
    if not isinstance(licence, str) or licence.strip().lower() in UNKNOWN_LICENCES:
        raise _refuse(folder, f"{CARD_FILE} names no licence (license: {licence or 'missing'}): "
                              "convert again with --license set to the source model's licence")
    return card


def check_folder(folder: Path) -> PublishableFolder:
    """Every check that needs no network, in the order a user fixes them; raises UploadRefusedError."""
    record = _read_record(folder)
    _check_results(folder, record)
    manifest = _read_manifest(folder, record)
    return PublishableFolder(folder=folder, manifest=manifest, record=record, card=_read_card(folder, manifest))


def require_token() -> None:
    """Fail before any work when no Hub token is configured (HF_TOKEN, or the one `hf auth login` stored)."""
    if get_token() is None:
        raise UploadError(f"not logged in to the Hugging Face Hub: {LOGIN_HINT}")


def _addition(folder: Path, name: str, record: FileRecord | None) -> CommitOperationAdd:
    operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name)
    if record is not None:  # hashed by the manifest check: huggingface_hub need not read the file again
        operation.upload_info.sha256 = bytes.fromhex(record.sha256.removeprefix("sha256:"))
    return operation


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _commit_message(checked: PublishableFolder) -> tuple[str, str]:
    source = checked.record.get("source") or {}
    origin = source.get("id") or Path(str(source.get("path", "?"))).name
    converter = (checked.record.get("converter") or {}).get("version", "?")
    summary = f"Upload {origin} converted to MLX (canary-convert {__version__})"
    description = (f"Converted by canary-convert {converter} from {origin}"
                   + (f" at commit {source['commit']}" if source.get("commit") else "")
                   + f"; licence {checked.licence}. Uploaded by canary-convert {__version__}.")
    return summary, description


class _Sent:
    """What has reached the Hub so far, for a failure message that says exactly that. Large files reach its
    storage one by one; the others travel inside the commit, so until the commit nothing else has arrived."""

    def __init__(self, files: list[str]):
        self.files = files
        self.stored: list[str] = []
        self.stage = "prepare"  # prepare -> store -> commit

    def outcome(self, target: str) -> str:
        if self.stage == "prepare":
            return "nothing was uploaded"
        if self.stage == "commit":
            return (f"every large file reached the Hub's storage but no commit was made, so {target} is as it was; "
                    "run the same command again to finish")
        missing = [name for name in self.files if name not in self.stored]
        return (f"large files stored before the failure: {', '.join(self.stored) or 'none'}; "
                f"not uploaded: {', '.join(missing)}; no commit was made, so {target} is as it was; "
                "run the same command again to finish (stored files are not sent twice)")


def upload(folder: Path, options: UploadOptions, on_step: Callable[[str], None] = lambda line: None) -> UploadResult:
    """Check `folder`, then create the repo (and branch) and commit every manifest file plus conversion.json."""
    checked = check_folder(folder)
    require_token()
    api = HfApi()
    files = checked.files
    nbytes = sum(record.size for record in checked.manifest.values()) + (folder / CONVERSION_FILE).stat().st_size
    transport = "Xet" if is_xet_available() else "Git LFS"
    sent = _Sent(files)
    on_step(f"{folder}: {len(checked.manifest)} files match the manifest, validation passed, "
            f"licence {checked.licence}")
    try:
        _prepare_repo(api, checked, options, on_step)
        on_step(f"uploading {len(files)} files ({_size(nbytes)}) to {options.target} over {transport}")
        sent.stage = "store"
        operations = [_addition(folder, name, checked.manifest.get(name)) for name in files]
        for operation in operations:
            api.preupload_lfs_files(options.repo_id, additions=[operation], revision=options.revision)
            # huggingface_hub marks each addition "lfs" (sent to storage now) or "regular" (sent in the commit).
            if operation._upload_mode == "lfs":
                sent.stored.append(operation.path_in_repo)
                on_step(f"stored {operation.path_in_repo} ({_size(operation.upload_info.size)})")
        sent.stage = "commit"
        summary, description = _commit_message(checked)
        info = api.create_commit(options.repo_id, operations, commit_message=summary,
                                 commit_description=description, revision=options.revision)
    except (HfHubHTTPError, httpx2.HTTPError, OSError, RuntimeError, ValueError) as exc:
        raise UploadError(f"{options.target}: {_describe(exc, options)}; {sent.outcome(options.target)}") from None
    return UploadResult(repo_id=options.repo_id, revision=options.revision or "main", commit=info.oid,
                        commit_url=info.commit_url, files=files, transport=transport)


def _prepare_repo(api: HfApi, checked: PublishableFolder, options: UploadOptions,
                  on_step: Callable[[str], None]) -> None:
    """Fail early on what the Hub would reject only at the commit, then make sure repo and branch exist."""
    try:
        checked.card.validate()
    except ValueError as exc:
        raise UploadRefusedError(f"{checked.folder / CARD_FILE}: the Hub rejects the card's metadata "
                                 f"({_first_line(str(exc))}); nothing was uploaded") from None
    # private=None leaves a new repo to the owner's default visibility; --private asks for a private one.
    api.create_repo(options.repo_id, private=True if options.private else None, exist_ok=True)
    if options.private and not api.repo_info(options.repo_id).private:
        raise UploadRefusedError(f"{options.repo_id} already exists and is public, and --private was given: "
                                 "make it private on the Hub or drop --private; nothing was uploaded")
    if options.revision not in (None, "main"):
        api.create_branch(options.repo_id, branch=options.revision, exist_ok=True)
    on_step(f"repo {options.repo_id} ready" + (f", branch {options.revision}" if options.revision else ""))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _describe(exc: BaseException, options: UploadOptions) -> str:
    """One line for what went wrong; huggingface_hub wraps a failed LFS transfer in a RuntimeError."""
    cause = exc
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, RevisionNotFoundError):
        return f"the repo has no branch {options.revision!r} (404)"
    if isinstance(cause, RepositoryNotFoundError):
        return (f"the Hub does not know this repo, or the token cannot see it "
                f"({cause.response.status_code}); check the name and {LOGIN_HINT}")
    if isinstance(cause, HfHubHTTPError):
        status, reason = cause.response.status_code, cause.response.reason_phrase
        message = _first_line(cause.server_message or "")
        said = f": {message}" if message and message != reason else ""
        if status == 401:
            return f"the Hub rejected the token (401 Unauthorized{said}); {LOGIN_HINT}"
        if status == 403:
            owner = options.repo_id.split("/", 1)[0]
            return f"the token may not write to {owner} (403 Forbidden{said}); use a token with write access to it"
        if status >= 500:
            return f"the Hub failed ({status} {reason}{said}); try again later"
        return f"the Hub refused ({status} {reason}{said})"
    if isinstance(cause, httpx2.ConnectError):
        return f"cannot reach the Hub at {constants.ENDPOINT} ({cause})"
    if isinstance(cause, httpx2.TimeoutException):
        return f"the Hub did not answer in time ({cause})"
    if isinstance(cause, httpx2.HTTPError):
        return f"the connection to the Hub failed ({cause})"
    return _first_line(str(cause)) or type(cause).__name__
