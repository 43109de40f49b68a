"""Read a `.nemo` checkpoint (plain tar, tar.gz, or a folder extracted from one) without trusting it.

Members are read by name, never extracted wholesale; members that could escape (absolute paths, `..`,
links, devices) are refused. The config goes through a safe YAML loader, bounded in size and in what its
aliases expand to, the weights through torch's weights-only unpickler (checkpoint_zip.py): mapped in place
from a plain-tar `.nemo` or a folder's `model_weights.ckpt`, and a compressed tar is decompressed once into
a temporary file that is then mapped the same way. Tensors are paged in as they are used.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
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
from .errors import DISK_REFUSED, ArchiveError, OutputError, UnsafeArchiveError, one_line

# gzip, bzip2 and xz magic numbers: tarfile opens all three (NeMo's old checkpoints are tar.gz).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
# canary-1b-v2 packs a second model, its CTC timestamp aligner, beside the main one (NeMo's
# EncDecMultiTaskModel restores it from these two members; its tokenizer files are `nemo:` artifacts).
ALIGNER_CONFIG_MEMBER = "timestamps_asr_model_config.yaml"
ALIGNER_WEIGHTS_MEMBER = "timestamps_asr_model_weights.ckpt"
ARTIFACT_PREFIX = "nemo:"

# Bounds on model_config.yaml, checked before any YAML is turned into objects. NeMo writes some KB (a few
# hundred nodes, more with its dataset sections); an alias bomb (a few lines whose aliases nest) expands to
# billions. 100,000 nodes take OmegaConf about 2 s.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # scalars, lists and mappings, each alias counted as the nodes it stands for
MAX_MEMBERS = 10_000  # files in a .nemo or its folder (NeMo writes a few dozen); each costs memory to list
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it: 10x faster


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
            raise ArchiveError(f"{self.path}: cannot read member {name!r}: {one_line(exc)}") from None
        assert handle is not None  # regular files only are listed
        with handle:
            yield handle

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.open_member(name) as handle:
                return handle.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{self.path}: member {name!r} is truncated or corrupt: {one_line(exc)}") from None

    def copy_member(self, name: str, destination: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream one member into a file, never holding it whole in memory."""
        try:
            with self.open_member(name) as source, destination.open("wb") as target:
                while chunk := source.read(16 << 20):
                    target.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"{self.path}: member {name!r} is truncated or corrupt: {one_line(exc)}") from None

    def config(self, member: str = CONFIG_MEMBER) -> dict[str, Any]:
        """`model_config.yaml` (or another model's config member, canary-1b-v2's aligner's), loaded safely (no
        Python tags) with its `${...}` interpolations resolved."""
        size = self.members.get(member, 0)
        if size > MAX_CONFIG_BYTES:
            raise ArchiveError(f"{self.path}: {member} holds {size} bytes, more than the "
                               f"{MAX_CONFIG_BYTES >> 20} MiB a config may take")
        raw = load_bounded_yaml(self.read_bytes(member), f"{self.path}: {member}")
        if not isinstance(raw, dict):
            raise ArchiveError(f"{self.path}: {member} does not hold a mapping")
        try:
            return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            raise ArchiveError(f"{self.path}: {member}: cannot resolve {one_line(exc)}") from None
        except RecursionError:
            raise ArchiveError(f"{self.path}: {member}: its interpolations refer to each other in a loop "
                               f"or nest too deeply") from None

    @property
    def has_aligner(self) -> bool:
        """Whether the archive carries canary-1b-v2's timestamp aligner (both of its members)."""
        return ALIGNER_CONFIG_MEMBER in self.members and ALIGNER_WEIGHTS_MEMBER in self.members

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
    def state_dict(self, on_bytes: Callable[[int], None] | None = None,
                   member: str = WEIGHTS_MEMBER) -> Iterator[dict[str, torch.Tensor]]:
        """The weights (of `member`), memory-mapped: in place from a folder or a plain tar, from a temporary
        copy of the member when the tar is compressed (one streaming pass: a compressed member cannot be mapped)."""
        label = f"{self.path}:{member}"
        if member not in self.members:
            raise ArchiveError(f"{self.path}: member {member!r} is missing from the archive")
        info = self._tar_members.get(member)
        if self._tar is None:
            yield map_checkpoint(self.path / member, 0, self.members[member], label)
        elif not self.compressed and info is not None and not info.issparse():
            state = map_checkpoint(self.path, info.offset_data, info.size, label)
            if on_bytes is not None:
                on_bytes(info.size)
            yield state
        else:
            with tempfile.TemporaryDirectory(prefix="canary-convert-") as scratch:
                weights_path = Path(scratch) / member
                try:
                    self.copy_member(member, weights_path, on_bytes)
                except OSError as exc:
                    if exc.errno not in DISK_REFUSED:
                        raise
                    raise OutputError(f"{scratch}: the disk refused a write while decompressing {label} "
                                      f"({exc.strerror}); set TMPDIR to a folder with room") from None
                yield map_checkpoint(weights_path, 0, self.members[member], label)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> NemoArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expanded_nodes(root: yaml.Node, label: str) -> int:
    """How many nodes the document stands for once every alias is replaced by what it names, refusing a
    document that holds itself; counted once per distinct node, so an alias bomb costs no more than its text."""
    sizes: dict[int, int] = {}
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while pending:
        node, children_done = pending.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), MAX_CONFIG_NODES + 1)
            continue
        if id(node) in open_nodes:
            raise ArchiveError(f"{label}: an alias refers to a node that holds it; refusing a recursive config")
        open_nodes.add(id(node))
        pending.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ArchiveError(f"{label}: an alias refers to a node that holds it; refusing a recursive config")
            pending.append((child, False))
    return sizes[id(root)]


def load_bounded_yaml(text: bytes, label: str) -> Any:
    """Safe YAML (no Python tags) whose aliases expand to at most `MAX_CONFIG_NODES` nodes: the document is
    composed into nodes (aliases stay shared, so this is as cheap as the text) and measured before any
    object is built from it."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_nodes(node, label)
        if expanded > MAX_CONFIG_NODES:
            raise ArchiveError(f"{label}: its aliases expand to more than {MAX_CONFIG_NODES} nodes; refusing a "
                               f"YAML alias bomb")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ArchiveError(f"{label} is not safe, plain YAML: {one_line(exc)}") from None
    except RecursionError:
        raise ArchiveError(f"{label}: nested too deeply to read") from None
    finally:
        loader.dispose()


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
        infos = []
        while (info := tar.next()) is not None:
            infos.append(info)
            if len(infos) > MAX_MEMBERS:
                tar.close()
                raise ArchiveError(f"{path}: more than {MAX_MEMBERS} members; refusing to list them all")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"{path}: not a readable .nemo archive (tar or tar.gz): {one_line(exc)}") from None
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
            if len(members) > MAX_MEMBERS:
                raise ArchiveError(f"{path}: more than {MAX_MEMBERS} files; refusing to list them all")
    archive = NemoArchive(path=path, members=members)
    _require_core_members(archive)
    return archive


def _require_core_members(archive: NemoArchive) -> None:
    for required in (CONFIG_MEMBER, WEIGHTS_MEMBER):
        if required not in archive.members:
            archive.close()
            raise ArchiveError(f"{archive.path}: member {required!r} is missing; is this a NeMo checkpoint?")
