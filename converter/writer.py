"""Write the MLX folder: safetensors shards streamed tensor by tensor, JSON files, atomic publication.

Everything goes into a hidden sibling of OUT that is renamed into place only when complete and
validated, so an interrupted or failed run leaves no OUT behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError
from .manifest import FileRecord, HashingWriter
from .model.load import INDEX_FILE, SINGLE_FILE
from .rules import TensorPlan

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # mlx-lm's default shard size

# safetensors' dtype codes
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

TensorCallback = Callable[[str, int], None]  # (target key, bytes written)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as it will be stored: its plan, output dtype and byte size."""

    plan: TensorPlan
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.plan.target_shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def output_tensors(plans: Sequence[TensorPlan], source: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[OutputTensor]:
    """Decide each tensor's stored dtype: a rule's pinned dtype, else `dtype` for floating tensors."""
    stored = []
    for plan in plans:
        source_dtype = source[plan.source_key].dtype
        if source_dtype not in _SAFETENSORS_DTYPES:
            raise OutputError(f"{plan.source_key}: dtype {source_dtype} cannot be stored in safetensors")
        out = (plan.pinned_dtype or dtype) if source_dtype.is_floating_point else source_dtype
        stored.append(OutputTensor(plan, out))
    return stored


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
        entries[tensor.plan.target_key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.plan.target_shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes


def write_safetensors(
    path: Path,
    tensors: Sequence[OutputTensor],
    source: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    on_tensor: TensorCallback | None = None,
) -> FileRecord:
    """Stream one safetensors file: header first, then each tensor converted and written on its own.

    Returns the file's manifest record, hashed on the way out."""
    header = _header(tensors, metadata)
    with path.open("wb") as raw:
        handle = HashingWriter(raw)
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor in tensors:
            data = tensor.plan.convert(source[tensor.plan.source_key], tensor.dtype)
            if tuple(data.shape) != tensor.plan.target_shape or data.dtype != tensor.dtype:
                raise OutputError(f"{tensor.plan.target_key}: converted to {tuple(data.shape)} {data.dtype}, "
                                  f"planned {tensor.plan.target_shape} {tensor.dtype}")
            handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            if on_tensor is not None:
                on_tensor(tensor.plan.target_key, tensor.nbytes)
    return handle.record()


def write_weights(
    folder: Path,
    tensors: Sequence[OutputTensor],
    source: Mapping[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: TensorCallback | None = None,
) -> dict[str, FileRecord]:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json`; returns each weight file's record."""
    shards = shard(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    records = {name: write_safetensors(folder / name, members, source, {"format": "mlx"}, on_tensor)
               for name, members in zip(names, shards)}
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.plan.target_key: name for name, members in zip(names, shards) for t in members},
        }
        write_json(folder / INDEX_FILE, index)
    return records


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it becomes OUT, on any failure it vanishes."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: exists and is not empty; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder: {exc}") from None
    try:
        yield staging
        _publish(staging, out)
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
