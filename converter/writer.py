"""Write the MLX folder: safetensors shards streamed tensor by tensor, JSON files, atomic publication.

Everything goes into a hidden sibling of OUT that is renamed into place only when complete and
validated, so an interrupted or failed run leaves no OUT behind. A lock beside OUT (`.OUT.lock`, held with
flock, which dies with its process) lets one conversion at a time write OUT; the run that holds it removes
the hidden siblings of runs that were killed before they could clean up.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch

from .errors import DISK_REFUSED, OutputError
from .manifest import FileRecord, HashingWriter
from .model.load import INDEX_FILE, SINGLE_FILE
from .quantize import QuantizationPlan, module_path, part_dtypes, part_shapes, quantize_tensor
from .rules import TensorPlan

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # `--max-shard-size 5GB`, the default

# safetensors' dtype codes, and their sizes in bytes
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_MX_CODES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}
_CODE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}

TensorCallback = Callable[[str, int], None]  # (target key, bytes written)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as it will be stored: a planned tensor whole, or one part of its quantized form.

    `dtype` is the float dtype the source is cast to: the stored dtype of a whole tensor, the dtype a
    quantized layer is quantized from (its scales keep it).
    """

    plan: TensorPlan
    dtype: torch.dtype
    key: str
    shape: tuple[int, ...]
    code: str  # safetensors dtype code
    part: str | None = None  # "weight", "scales" or "biases" of a quantized layer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _CODE_BYTES[self.code]


def output_tensors(plans: Sequence[TensorPlan], source: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   quantization: QuantizationPlan | None = None) -> list[OutputTensor]:
    """Decide what is stored: a rule's pinned dtype, else `dtype` for floating tensors; the parts of each
    quantized layer in place of its weight."""
    stored = []
    for plan in plans:
        source_dtype = source[plan.source_key].dtype
        if source_dtype not in _SAFETENSORS_DTYPES:
            raise OutputError(f"{plan.source_key}: dtype {source_dtype} cannot be stored in safetensors")
        out = (plan.pinned_dtype or dtype) if source_dtype.is_floating_point else source_dtype
        if quantization is not None and quantization.quantizes(plan):
            path = module_path(plan.target_key)
            codes = {part: _MX_CODES[kind] for part, kind in part_dtypes(out, quantization.options).items()}
            stored.extend(OutputTensor(plan, out, f"{path}.{part}", shape, codes[part], part)
                          for part, shape in part_shapes(plan.target_shape, quantization.options).items())
        else:
            stored.append(OutputTensor(plan, out, plan.target_key, plan.target_shape, _SAFETENSORS_DTYPES[out]))
    return stored


def mx_bytes(array: mx.array) -> bytes:
    """An MLX array's raw bytes (numpy has no bfloat16: those go through their 16-bit pattern)."""
    return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array).tobytes()


class TensorBytes:
    """Each stored tensor's bytes, made when written; a quantized layer is quantized once for all its parts."""

    def __init__(self, source: Mapping[str, torch.Tensor], quantization: QuantizationPlan | None):
        self.source = source
        self.quantization = quantization
        self._parts: tuple[TensorPlan | None, dict[str, mx.array]] = (None, {})

    def __call__(self, tensor: OutputTensor) -> bytes | memoryview:
        plan = tensor.plan
        if tensor.part is None:
            data = plan.convert(self.source[plan.source_key], tensor.dtype)
            shape, kind = tuple(data.shape), _SAFETENSORS_DTYPES.get(data.dtype)
            # A view, not a copy: a tensor stored as the source holds it is written from the mapped .nemo.
            raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b""
        else:
            assert self.quantization is not None
            if self._parts[0] is not plan:
                self._parts = (plan, quantize_tensor(plan, self.source[plan.source_key], tensor.dtype,
                                                     self.quantization.options))
            array = self._parts[1][tensor.part]
            shape, kind, raw = tuple(array.shape), _MX_CODES.get(array.dtype), mx_bytes(array)
        if shape != tensor.shape or kind != tensor.code:
            raise OutputError(f"{tensor.key}: made {shape} {kind}, planned {tensor.shape} {tensor.code}")
        return raw


def shard(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy split in plan order, as mlx-lm does: a new shard when the next tensor would overflow."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def _header(tensors: Sequence[OutputTensor], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for tensor in tensors:
        entries[tensor.key] = {
            "dtype": tensor.code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes


def write_safetensors(
    path: Path,
    tensors: Sequence[OutputTensor],
    tensor_bytes: Callable[[OutputTensor], bytes | memoryview],
    metadata: Mapping[str, str],
    on_tensor: TensorCallback | None = None,
) -> FileRecord:
    """Stream one safetensors file: header first, then each tensor converted and written on its own.

    Returns the file's manifest record, hashed on the way out."""
    header = _header(tensors, metadata)
    with path.open("wb") as raw, HashingWriter(raw) as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor in tensors:
            handle.write(tensor_bytes(tensor))
            if on_tensor is not None:
                on_tensor(tensor.key, tensor.nbytes)
    return handle.record()


def write_weights(
    folder: Path,
    tensors: Sequence[OutputTensor],
    tensor_bytes: Callable[[OutputTensor], bytes | memoryview],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: TensorCallback | None = None,
) -> dict[str, FileRecord]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json`, and any side file a rule
    names (safetensors format too); returns each tensor file's record."""
    in_weights = [tensor for tensor in tensors if not tensor.plan.rule.file]
    shards = shard(in_weights, max_shard_bytes)
    names = shard_names(len(shards))
    records = {name: write_safetensors(folder / name, members, tensor_bytes, {"format": "mlx"}, on_tensor)
               for name, members in zip(names, shards)}
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in in_weights)},
            "weight_map": {t.key: name for name, members in zip(names, shards) for t in members},
        }
        write_json(folder / INDEX_FILE, index)
    for side in sorted({tensor.plan.rule.file for tensor in tensors if tensor.plan.rule.file}):
        members = [tensor for tensor in tensors if tensor.plan.rule.file == side]
        records[side] = write_safetensors(folder / side, members, tensor_bytes, {"format": "mlx"}, on_tensor)
    return records


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside OUT: a second conversion into the same OUT fails at once instead of replacing
    the first one's output. The lock is released by the kernel when its process dies, however it dies."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create its lock file {lock.name}: {exc.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise OutputError(f"{out}: another canary-convert (pid {holder}) is writing it; wait for it to finish "
                              f"or choose another OUT") from None
        # The run that held the lock removes the file as it lets go: ours must still be the one at that path.
        try:
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(descriptor)


def _remove_stale(out: Path) -> None:
    """Remove what killed runs into OUT left beside it (`.OUT.partial-*` being written, `.OUT.old-*` being
    replaced); only called with OUT's lock held, so no live run owns them."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-[0-9a-f]{{8}}")
    for sibling in out.parent.iterdir():
        if stale.fullmatch(sibling.name) and sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it becomes OUT, on any failure it vanishes.

    A disk that refuses a write (full, over quota, read-only) is an OutputError naming OUT."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    with _output_lock(out):
        if out.is_dir() and any(out.iterdir()) and not force:
            raise OutputError(f"{out}: exists and is not empty; pass --force to replace it")
        _remove_stale(out)
        try:
            staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"{out}: cannot create the output folder: {exc.strerror}") from None
        try:
            yield staging
            _publish(staging, out)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno not in DISK_REFUSED:
                raise
            raise OutputError(f"{out}: the disk refused a write ({exc.strerror}); nothing was left behind") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old OUT (with --force) is moved aside first, then removed."""
    retired = None
    if out.exists():
        retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, retired)
    try:
        os.replace(staging, out)
    except OSError as exc:
        if retired is not None:
            os.replace(retired, out)
        raise OutputError(f"{out}: cannot move the finished folder into place: {exc}") from None
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
