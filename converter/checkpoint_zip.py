"""The tensors of a `torch.save` checkpoint, mapped in place from a byte range of a larger file.

A plain-tar `.nemo` holds `model_weights.ckpt` uncompressed at a fixed offset, and `torch.save` writes a
zip whose records are stored, never compressed: every tensor's bytes are a range of the `.nemo` itself.
Mapping the file and pointing each tensor at its range reads nothing up front and copies nothing; pages
come in as the conversion touches them. The pickle that names and shapes the tensors goes through torch's
weights-only unpickler, as `torch.load(weights_only=True)` does, and every offset and size read from the
zip is checked against the member before any tensor is built on it.

A hostile checkpoint is held to the input's own size: the pickle record may not exceed `MAX_PICKLE_BYTES`
(checked on the size the zip declares, which bounds what inflating it can produce), and no tensor may hold
more elements than its storage has bytes for (a stride-0 tensor would grow without bound when copied). A
file that shrinks while mapped would kill the process with SIGBUS when a page past its new end is touched;
every tensor lookup first checks the file still reaches the member's end (`MappedTensors`).
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

from .errors import ArchiveError, UnsafeArchiveError, one_line

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra-field lengths at 26 and 28
_LOCAL_SIGNATURE = b"PK\x03\x04"

# The largest `data.pkl` record read (its declared, inflated size). The pickle only names and shapes the
# tensors, about 180 bytes each (the test checkpoints'): a few hundred KB for canary-1b's ~1,400 tensors,
# so 64 MiB leaves room for models a hundred times larger.
MAX_PICKLE_BYTES = 64 << 20


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a mapping, for zipfile."""

    def __init__(self, mapping: mmap.mmap, start: int, size: int):
        self._view = memoryview(mapping)[start : start + size]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def close(self) -> None:
        self._view.release()
        super().close()


class _StorageMap:
    """The checkpoint's storages by key, each a tensor over its own range of the mapped file."""

    def __init__(self, mapping: mmap.mmap, start: int, size: int, records: dict[str, zipfile.ZipInfo],
                 prefix: str, label: str):
        self._mapping, self._start, self._size = mapping, start, size
        self._records, self._prefix, self._label = records, prefix, label
        self._loaded: dict[str, torch.storage.TypedStorage] = {}

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes begin in the member: after its local header, name and extra field."""
        header = info.header_offset
        if header + _LOCAL_HEADER.size > self._size:
            raise ArchiveError(f"{self._label}: record {info.filename} starts at {header}, outside the member "
                               f"({self._size} bytes)")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(self._mapping, self._start + header)
        name_start = self._start + header + _LOCAL_HEADER.size
        if signature != _LOCAL_SIGNATURE or self._mapping[name_start : name_start + name_length] != info.orig_filename.encode():
            raise ArchiveError(f"{self._label}: record {info.filename} has no local header at offset {header}")
        return header + _LOCAL_HEADER.size + name_length + extra_length

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        if key in self._loaded:
            return self._loaded[key]
        name = f"{self._prefix}data/{key}"
        info = self._records.get(name)
        if info is None:
            raise ArchiveError(f"{self._label}: storage {key} is missing (no record {name})")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArchiveError(f"{self._label}: record {name} is compressed; torch.save stores every storage as is")
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if info.file_size != nbytes:
            raise ArchiveError(f"{self._label}: record {name} holds {info.file_size} bytes, but its {numel} "
                               f"{dtype} elements need {nbytes}")
        offset = self._data_offset(info)
        if offset + nbytes > self._size:
            raise ArchiveError(f"{self._label}: record {name} spans bytes {offset}..{offset + nbytes}, past the "
                               f"end of the member ({self._size} bytes)")
        if nbytes:
            data = torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes, offset=self._start + offset)
        else:
            data = torch.empty(0, dtype=torch.uint8)
        typed = torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)
        self._loaded[key] = typed
        return typed


class _Unpickler(WeightsOnlyUnpickler):
    """torch's weights-only unpickler, with storages taken from the mapped file."""

    def __init__(self, file: io.BytesIO, storages: _StorageMap):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for weights-only loads
        self._storages = storages

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        # torch.save's persistent id: ("storage", storage type, key, location, element count).
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return self._storages.storage(str(key), dtype, int(numel))


@dataclass(frozen=True)
class MappedSource:
    """A mapped file and the byte its tensors reach; `check` refuses the file once it has shrunk below that."""

    label: str
    end: int
    size_now: Callable[[], int]  # fstat through a descriptor held open for the purpose

    def check(self) -> None:
        size = self.size_now()
        if size < self.end:
            raise ArchiveError(f"{self.label}: the file shrank to {size} bytes while being read (the checkpoint "
                               f"ends at byte {self.end}); was it overwritten or truncated?")


class MappedTensors(dict[str, torch.Tensor]):
    """A state dict whose tensors are pages of mapped files; each lookup first checks that the files still
    hold the checkpoint's bytes, so a source truncated during a conversion is an error, not a SIGBUS.

    Every read of tensor data in a conversion goes through a lookup (`state[key]`) just before it, so a file
    cut while mapped is caught at the next tensor; only a cut during that one tensor's read is not.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], sources: Sequence[MappedSource]):
        super().__init__(tensors)
        self._sources = tuple(sources)

    def __getitem__(self, key: str) -> torch.Tensor:
        for source in self._sources:
            source.check()
        return super().__getitem__(key)

    def subset(self, keys: Iterable[str]) -> MappedTensors:
        """Some of the tensors, guarded the same way (a plain dict of them would not be)."""
        return MappedTensors({key: super(MappedTensors, self).__getitem__(key) for key in keys}, self._sources)


def _pickle_record(archive: zipfile.ZipFile, label: str) -> str:
    """The one `<prefix>/data.pkl` record torch.save writes, refused when it declares more than
    `MAX_PICKLE_BYTES` (zipfile inflates no more than the declared size, so the check bounds the read)."""
    found = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(found) != 1:
        raise ArchiveError(f"{label}: not a torch.save checkpoint (expected one */data.pkl record, found {len(found)})")
    declared = archive.getinfo(found[0]).file_size
    if declared > MAX_PICKLE_BYTES:
        raise ArchiveError(f"{label}: record {found[0]} declares {declared} bytes, more than the "
                           f"{MAX_PICKLE_BYTES >> 20} MiB a checkpoint's pickle may take")
    return found[0]


def _require_state_dict(loaded: Any, label: str) -> dict[str, torch.Tensor]:
    """Tensors by name, each holding no more elements than its storage has bytes for: a tensor that repeats
    its bytes (stride 0) would be expanded to its full size by the first copy."""
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ArchiveError(f"{label}: expected a state dict of named tensors")
    for key, tensor in loaded.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > tensor.untyped_storage().nbytes():
            raise ArchiveError(f"{label}: tensor {key} has shape {tuple(tensor.shape)} and stride {tensor.stride()}: "
                               f"{nbytes} bytes of elements over a storage of {tensor.untyped_storage().nbytes()}; "
                               f"a tensor may not hold more elements than its storage")
    return loaded


def map_checkpoint(path: Path, start: int, size: int, label: str) -> MappedTensors:
    """The state dict of the `torch.save` zip at bytes [start, start + size) of `path`, tensors mapped in place.

    The mapping is private (copy on write): the file is never written, whatever is done to the tensors.
    """
    with path.open("rb") as handle:
        file_size = handle.seek(0, io.SEEK_END)
        if start + size > file_size:
            raise ArchiveError(f"{label}: truncated: the member ends at byte {start + size}, the file at {file_size}")
        if file_size == 0:
            raise ArchiveError(f"{label}: not a readable torch checkpoint: the file is empty")
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        with _Window(mapping, start, size) as window, zipfile.ZipFile(window) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickle_name = _pickle_record(archive, label)
            prefix = pickle_name[: -len("data.pkl")]
            byteorder = records.get(prefix + "byteorder")  # sized before it is read: any record may be a bomb
            if byteorder is not None and (byteorder.file_size > len(b"little") or archive.read(byteorder) != b"little"):
                raise ArchiveError(f"{label}: big-endian checkpoints are not supported")
            storages = _StorageMap(mapping, start, size, records, prefix, label)
            data = archive.read(pickle_name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, zlib.error,
            OverflowError) as exc:
        raise ArchiveError(f"{label}: not a readable torch checkpoint: {one_line(exc)}") from None
    if data[:1] == pickle.PROTO and data[1:2] and data[1] > pickle.HIGHEST_PROTOCOL:
        raise ArchiveError(f"{label}: not a readable torch checkpoint: {pickle_name} has pickle protocol {data[1]}")
    try:
        loaded = _Unpickler(io.BytesIO(data), storages).load()
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UnsafeArchiveError(f"{label}: refused by torch's weights-only loader: {first_line}") from None
    except (RuntimeError, EOFError, struct.error, TypeError, AttributeError, ValueError, IndexError, KeyError,
            OverflowError, RecursionError) as exc:
        # torch refuses a tensor whose shape, stride or offset reaches past its storage here.
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ArchiveError(f"{label}: not a readable torch checkpoint: {first_line}") from None
    # mmap.size() is an fstat of the descriptor the mapping keeps.
    return MappedTensors(_require_state_dict(loaded, label), [MappedSource(label, start + size, mapping.size)])
