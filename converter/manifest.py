"""The manifest of an MLX folder: every file with its size and sha256, recorded in `conversion.json`.

Uploading refuses a folder that no longer matches its manifest, and `verify` names the file that changed.
Weight files are hashed while they are written (`HashingWriter`), so recording the manifest costs no
second read of the large files.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import ModelFolderError
from .untrusted import file_problem, folder_file, read_json, safe_name

CONVERSION_FILE = "conversion.json"
# Files a folder may carry that are not part of a conversion: the Hub adds .gitattributes to every repo,
# and huggingface_hub keeps its download metadata under .cache/huggingface in a local copy.
NOT_CONVERTED = (".gitattributes",)
NOT_CONVERTED_DIRS = (".git", ".cache")
_CHUNK = 16 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str  # "sha256:<hex>", as conversion.json writes every digest

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileRecord:
        return cls(size=int(data["size"]), sha256=str(data["sha256"]))


class HashingWriter:
    """A binary file that hashes what is written to it: the manifest entry comes for free.

    The hashing runs on a second thread (hashlib lets go of the GIL), so at about 2 GB/s it overlaps the
    writes instead of adding to them. Use it as a context manager, and `record()` once it has closed; what
    is written must stay unchanged until then (the hash reads it later).
    """

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self._digest = hashlib.sha256()
        self._pending: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=4)
        self._failure: BaseException | None = None
        self._hasher = threading.Thread(target=self._hash, name="sha256", daemon=True)
        self._hasher.start()
        self.size = 0

    def _hash(self) -> None:
        while (data := self._pending.get()) is not None:
            if self._failure is None:  # after a failure, keep taking what is queued so no writer waits
                try:
                    self._digest.update(data)
                except BaseException as exc:  # noqa: BLE001 - re-raised on the writer's thread
                    self._failure = exc

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hasher.is_alive():
            self._pending.put(None)
            self._hasher.join()
        if self._failure is not None and exc[0] is None:
            raise self._failure

    def write(self, data: bytes | memoryview) -> int:
        self._pending.put(data)
        self.size += len(data)
        return self._handle.write(data)

    def record(self) -> FileRecord:
        if self._hasher.is_alive():
            raise RuntimeError("HashingWriter.record() before the writer was closed")
        return FileRecord(self.size, "sha256:" + self._digest.hexdigest())


def hash_file(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size, "sha256:" + digest.hexdigest())


def folder_files(folder: Path) -> list[str]:
    """Every entry of the folder a conversion accounts for, as sorted POSIX paths relative to it: its files,
    and whatever else is not a directory of its own (a link to a directory, a device, a pipe), so that
    verify and upload see it too. Links are not followed."""
    names = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        relative = here.relative_to(folder)
        entries = list(files)
        for name in list(dirs):
            if (here / name).is_symlink():
                dirs.remove(name)
                entries.append(name)
            elif not relative.parts and name in NOT_CONVERTED_DIRS:
                dirs.remove(name)
        names += [posix for name in entries
                  if (posix := (relative / name).as_posix()) not in (*NOT_CONVERTED, CONVERSION_FILE)]
    return sorted(names)


def build_manifest(folder: Path, hashed: Mapping[str, FileRecord] | None = None) -> dict[str, FileRecord]:
    """The manifest of `folder`; files in `hashed` (hashed while written) are not read again."""
    hashed = hashed or {}
    manifest = {}
    for name in folder_files(folder):
        known = hashed.get(name)
        if known is None or known.size != (folder / name).stat().st_size:
            known = hash_file(folder / name)
        manifest[name] = known
    return manifest


def manifest_problems(folder: Path, recorded: Mapping[str, FileRecord], *, added: bool = True) -> list[str]:
    """What differs between the folder and its manifest: one line per missing, added (unless `added` is False:
    a Hub snapshot holds what was fetched, not the whole repo), changed or unreadable file (a link out of the
    folder, a device: untrusted.py's `folder_file`). Files are hashed on parallel threads (hashlib lets go of
    the GIL)."""
    present = set(folder_files(folder))
    problems = [f"{name}: missing (the manifest lists it)" for name in sorted(set(recorded) - present)]
    if added:
        problems += [f"{name}: not in the manifest (added after the conversion)"
                     for name in sorted(present - set(recorded))]
    same_size = []
    for name in sorted(present & set(recorded)):
        want = recorded[name]
        if problem := file_problem(folder, name):
            problems.append(f"{name}: {problem}")
        elif (size := (folder / name).stat().st_size) != want.size:
            problems.append(f"{name}: {size} bytes, the manifest says {want.size}")
        else:
            same_size.append(name)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda name: hash_file(folder / name).sha256, same_size)
        problems += [f"{name}: sha256 differs from the manifest (same size, changed content)"
                     for name, digest in zip(same_size, digests) if digest != recorded[name].sha256]
    return problems


def read_record(folder: Path) -> dict[str, Any]:
    """A folder's `conversion.json`, or the error that says why it is not a canary-convert folder."""
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    if not (folder / CONVERSION_FILE).exists():
        raise ModelFolderError(f"{folder}: not a canary-convert folder ({CONVERSION_FILE} is missing)")
    record = read_json(folder_file(folder, CONVERSION_FILE))
    if not isinstance(record, dict):
        raise ModelFolderError(f"{folder}: {CONVERSION_FILE} is not a JSON object")
    return record


def recorded_manifest(folder: Path, record: dict[str, Any]) -> dict[str, FileRecord]:
    """The manifest `conversion.json` records, or the error that says it has none (or a malformed one)."""
    entries = record.get("manifest")
    if not isinstance(entries, dict) or not entries:
        raise ModelFolderError(f"{folder}: {CONVERSION_FILE} has no manifest (written by an older canary-convert): "
                               "convert again")
    manifest = {}
    for name, entry in entries.items():
        where = f"{folder}: {CONVERSION_FILE} manifest[{name!r}]"
        safe_name(folder, name, f"{CONVERSION_FILE} manifest")
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise ModelFolderError(f"{where}: not an object with size and sha256")
        size, digest = entry["size"], entry["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ModelFolderError(f"{where}.size: {size!r} is not a byte count")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ModelFolderError(f"{where}.sha256: {digest!r} is not 'sha256:' and 64 hex digits")
        manifest[name] = FileRecord(size, digest)
    return manifest
