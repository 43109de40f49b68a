"""A converted folder is untrusted input: `verify` exists for folders downloaded from anywhere.

Every file name the folder itself gives (an index's shards, config.json's tokenizer paths, a manifest's
entries) must name a regular file inside the folder, and every JSON file in it is read within bounds
(size, nesting, numbers JSON allows), so a hostile folder meets one error naming the file, never a
traceback, a read outside the folder or a read without end.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CanaryConvertError, ModelFolderError

# Far above what a conversion writes (canary-1b: conversion.json ~40 kB, goldens.json ~0.3 MB, the
# index ~60 kB); read whole, so this bounds the memory a hostile file can cost (about 10x in Python objects).
MAX_JSON_BYTES = 16 << 20
# Our files nest at most 6 deep (goldens: groups, group, stages, rows, row, values).
MAX_JSON_DEPTH = 32

ErrorClass = Callable[[str], CanaryConvertError]


def _where(folder: Path, name: object, what: str | None) -> str:
    return f"{folder}: {what} names {name!r}" if what else f"{folder}: {name}"


def safe_name(folder: Path, name: object, what: str | None = None, error: ErrorClass = ModelFolderError) -> str:
    """`name` as a plain folder-relative POSIX path: not absolute, no `..`, no `./` or `//`, no backslash.
    `what` says who gave the name (`model.safetensors.index.json`), for the message."""
    path = PurePosixPath(name) if isinstance(name, str) and name else None
    if path is None or path.is_absolute() or ".." in path.parts or path.as_posix() != name or "\\" in name \
            or "\0" in name:
        raise error(f"{_where(folder, name, what)}: not a plain file name inside the folder (no absolute path, no '..')")
    return name


def allowed_roots(folder: Path) -> list[Path]:
    """Where the folder's files may really be: the folder itself, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<commit>/`, whose files are links to `../../blobs/<hash>`) the repo's blobs."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def file_problem(folder: Path, name: str) -> str | None:
    """Why the plain relative `name` is not a regular file inside the folder (links followed; the Hub cache's
    blobs of this repo count as inside), or None when it is."""
    try:
        target = (Path(folder) / name).resolve(strict=True)
        mode = target.stat().st_mode
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of links
        return f"cannot be read ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})"
    if not any(target.is_relative_to(root) for root in allowed_roots(Path(folder))):
        return f"leads outside the folder (to {target})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def folder_file(folder: Path, name: object, what: str | None = None, error: ErrorClass = ModelFolderError) -> Path:
    """`folder / name`, once `name` is a plain relative name and what it leads to (links followed) is a regular
    file inside the folder (or the Hub cache's blobs of this repo): no `..`, no absolute path, no `/dev/zero`."""
    safe = safe_name(folder, name, what, error)
    if problem := file_problem(folder, safe):
        raise error(f"{_where(folder, name, what)}: {problem}")
    return Path(folder) / safe


def folder_dir(folder: Path, name: object, what: str | None = None, error: ErrorClass = ModelFolderError) -> Path:
    """`folder / name` for a sub-folder the folder names (a speech-LLM's `llm_folder`): a plain relative name of
    a directory inside the folder, links followed (its files are the manifest's to check)."""
    path = Path(folder) / safe_name(folder, name, what, error)
    target = path.resolve()
    if not target.is_relative_to(Path(folder).resolve()):
        raise error(f"{_where(folder, name, what)}: leads outside the folder (to {target})")
    if not target.is_dir():
        raise error(f"{_where(folder, name, what)}: not a folder")
    return path


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests no deeper than `limit` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path, error: ErrorClass = ModelFolderError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of an untrusted folder: a regular file of at most `max_bytes`, standard JSON (no NaN or
    Infinity), nested at most `MAX_JSON_DEPTH` deep; any other is `error("<path>: why")`."""
    try:
        # Not blocking: a pipe in place of the file is refused below instead of waiting for a writer.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{path}: not a regular file")
            if info.st_size > max_bytes:
                raise error(f"{path}: {info.st_size} bytes, more than the {max_bytes} a canary-convert JSON file may have")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes} bytes a canary-convert JSON file may have")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{path}: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not json_depth_ok(value):
        raise error(f"{path}: nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def finite_number(value: object) -> bool:
    """A JSON number that is a real, finite number (bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
