"""Read a `.nemo` checkpoint (plain tar, tar.gz, or a folder extracted from one) without trusting it.

Members are read by name, never extracted wholesale; members that could escape (absolute paths, `..`,
links, devices) are refused. The config goes through a safe YAML loader, the weights through torch's
weights-only unpickler: in a plain tar they are mapped in place from the `.nemo` itself (checkpoint_zip.py),
in a folder through `torch.load(weights_only=True, mmap=True)`, and a compressed tar is decompressed once
into a temporary file that is then mapped the same way. Tensors are paged in as they are used.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpoint_zip import map_checkpoint
from .errors import ArchiveError, UnsafeArchiveError

# gzip, bzip2 and xz magic numbers: tarfile opens all three (NeMo's old checkpoints are tar.gz).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
ARTIFACT_PREFIX = "nemo:"


def _member_name(raw: str) -> str:
    """Normalise a member name (`./x` -> `x`) and refuse one that could escape the archive."""
    path = PurePosixPath(raw)
    if raw.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"archive member {raw!r} has an absolute path; refusing to read it")
    parts = [part for part in path.parts if part != "."]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {raw!r} climbs out of the archive ('..'); refusing to read it")
    return "/".join(parts)


@dataclass(frozen=True)
class Artifact:
    """A file the config refers to as `nemo:<member>`, e.g. a tokenizer model."""

    config_path: str  # dotted path in model_config.yaml, e.g. tokenizer.langs.en.model_path
    member: str


@dataclass
class NemoArchive:
    """An opened checkpoint: its members by name, its config, and access to tensors and artifacts."""

    path: Path
    members: dict[str, int]  # name -> size in bytes, regular files only
    compressed: bool = False  # a tar.gz (or bz2, xz): members can only be streamed, not mapped
    _tar: tarfile.TarFile | None = field(default=None, repr=False)
    _tar_members: dict[str, tarfile.TarInfo] = field(default_factory=dict, repr=False)

    @property
    def is_folder(self) -> bool:
        return self._tar is None

    @contextmanager
    def open_member(self, name: str) -> Iterator[IO[bytes]]:
        """Open one member for reading; a missing member is an error naming it."""
        if name not in self.members:
            raise ArchiveError(f"{self.path}: member {name!r} is missing from the archive")
        if self._tar is None:
            with (self.path / name).open("rb") as handle:
                yield handle
            return
        try:
            handle = self._tar.extractfile(self._tar_members[name])
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.path}: cannot read member {name!r}: {exc}") from None
        assert handle is not None  # regular files only are listed
        with handle:
            yield handle

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.open_member(name) as handle:
                return handle.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{self.path}: member {name!r} is truncated or corrupt: {exc}") from None

    def copy_member(self, name: str, destination: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream one member into a file, never holding it whole in memory."""
        try:
            with self.open_member(name) as source, destination.open("wb") as target:
                while chunk := source.read(16 << 20):
                    target.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{self.path}: member {name!r} is truncated or corrupt: {exc}") from None

    def config(self) -> dict[str, Any]:
        """`model_config.yaml`, loaded safely (no Python tags) with its `${...}` interpolations resolved."""
        text = self.read_bytes(CONFIG_MEMBER)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ArchiveError(f"{self.path}: {CONFIG_MEMBER} is not safe, plain YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ArchiveError(f"{self.path}: {CONFIG_MEMBER} does not hold a mapping")
        try:
            return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            raise ArchiveError(f"{self.path}: {CONFIG_MEMBER}: cannot resolve {exc}") from None

    def artifacts(self, config: dict[str, Any]) -> list[Artifact]:
        """Every `nemo:` reference in the config, each checked to exist in the archive."""
        found: list[Artifact] = []

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}.{key}" if prefix else str(key))
            elif isinstance(node, list):
                for index, value in enumerate(node):
                    walk(value, f"{prefix}.{index}")
            elif isinstance(node, str) and node.startswith(ARTIFACT_PREFIX):
                member = _member_name(node[len(ARTIFACT_PREFIX) :])
                if member not in self.members:
                    raise ArchiveError(f"{self.path}: {prefix} refers to {node!r}, which the archive lacks")
                found.append(Artifact(config_path=prefix, member=member))

        walk(config, "")
        return found

    @contextmanager
    def state_dict(self, on_bytes: Callable[[int], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The weights, memory-mapped: in place from a folder or a plain tar, from a temporary copy of the
        member when the tar is compressed (one streaming pass: a compressed member cannot be mapped)."""
        label = f"{self.path}:{WEIGHTS_MEMBER}"
        if WEIGHTS_MEMBER not in self.members:
            raise ArchiveError(f"{self.path}: member {WEIGHTS_MEMBER!r} is missing from the archive")
        info = self._tar_members.get(WEIGHTS_MEMBER)
        if self._tar is None:
            yield load_weights(self.path / WEIGHTS_MEMBER, label)
        elif not self.compressed and info is not None and not info.issparse():
            state = _require_state_dict(map_checkpoint(self.path, info.offset_data, info.size, label), label)
            if on_bytes is not None:
                on_bytes(info.size)
            yield state
        else:
            with tempfile.TemporaryDirectory(prefix="canary-convert-") as scratch:
                weights_path = Path(scratch) / WEIGHTS_MEMBER
                self.copy_member(WEIGHTS_MEMBER, weights_path, on_bytes)
                yield load_weights(weights_path, label)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_weights(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Load a state dict with the restricted unpickler; anything but tensors by name is refused."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UnsafeArchiveError(f"{label}: refused by torch's weights-only loader: {first_line}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{label}: not a readable torch checkpoint: {exc}") from None
    return _require_state_dict(loaded, label)


def _require_state_dict(loaded: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ArchiveError(f"{label}: expected a state dict of named tensors")
    return loaded


def open_archive(path: Path) -> NemoArchive:
    """Open a `.nemo` file or an extracted folder, listing and checking every member up front."""
    if path.is_dir():
        return _open_folder(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such file")
    try:
        with path.open("rb") as handle:
            compressed = handle.read(6).startswith(_COMPRESSED_MAGIC)
        tar = tarfile.open(path, mode="r:*")
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"{path}: not a readable .nemo archive (tar or tar.gz): {exc}") from None
    archive = NemoArchive(path=path, members={}, compressed=compressed, _tar=tar)
    try:
        for info in infos:
            name = _member_name(info.name)
            if info.isdir():
                continue
            if not info.isfile():
                kind = "link" if info.issym() or info.islnk() else "device or special file"
                raise UnsafeArchiveError(f"{path}: member {info.name!r} is a {kind}; refusing to read it")
            archive.members[name] = info.size
            archive._tar_members[name] = info
    except BaseException:
        tar.close()
        raise
    _require_core_members(archive)
    return archive


def _open_folder(path: Path) -> NemoArchive:
    members: dict[str, int] = {}
    root = path.resolve()
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            file_path = Path(dirpath) / filename
            name = file_path.relative_to(root).as_posix()
            if file_path.is_symlink() or not file_path.is_file():
                raise UnsafeArchiveError(f"{path}: {name!r} is a link or special file; refusing to read it")
            members[name] = file_path.stat().st_size
    archive = NemoArchive(path=path, members=members)
    _require_core_members(archive)
    return archive


def _require_core_members(archive: NemoArchive) -> None:
    for required in (CONFIG_MEMBER, WEIGHTS_MEMBER):
        if required not in archive.members:
            archive.close()
            raise ArchiveError(f"{archive.path}: member {required!r} is missing; is this a NeMo checkpoint?")
