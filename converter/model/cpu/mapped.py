"""A safetensors file's tensors as views of its memory map, copied into MLX arrays when asked for.

`mx.load` reads a tensor with buffered file reads: about 2 GB/s on the development machine. A copy out of
a mapping of the page cache runs at memory speed (20-27 GB/s there), and until it is copied a tensor
holds only file-backed pages, which the kernel may drop. The golden outputs' streamed passes
(`streaming.py`) copy every layer's weights in again for each call, so this is most of their reading.
Half-precision weights of the layers that multiply in float32 on x86 (`widened.py`) can be widened on
the way in, where the conversion is fast (`Widener`).
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...errors import ModelFolderError
from ...extensions import extension_path

# safetensors dtype code -> (numpy dtype of the bytes, MLX dtype): every code the writer stores. numpy has
# no bfloat16, so those bytes are copied as uint16 and reinterpreted.
_DTYPES: dict[str, tuple[type[np.generic], mx.Dtype]] = {
    "F64": (np.float64, mx.float64),
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "I16": (np.int16, mx.int16),
    "I8": (np.int8, mx.int8),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}


@dataclass(frozen=True)
class MappedTensor:
    """One stored tensor: a read-only view of the mapped file, and the MLX dtype it holds."""

    view: np.ndarray
    dtype: mx.Dtype

    def load(self) -> mx.array:
        """A copy in an MLX array (anonymous memory), as `mx.load` would give it once evaluated."""
        array = mx.array(self.view)
        return array if array.dtype == self.dtype else array.view(self.dtype)


class Widener:
    """float16 and bfloat16 tensors copied into MLX arrays as float32, exactly, through buffers kept for
    reuse: fresh ones for every tensor made a streamed canary-1b float16 decoder call twice as slow (glibc
    gives such large blocks back to the kernel when freed, and they return as page faults)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, tensor: MappedTensor) -> mx.array:
        buffer = self._buffers.get(tensor.view.shape)
        if buffer is None:
            buffer = self._buffers[tensor.view.shape] = np.empty(tensor.view.shape, dtype=np.float32)
        return mx.array(widened(tensor.view, tensor.dtype, buffer))


@functools.cache
def _float16_widener() -> Callable[[np.ndarray, np.ndarray], bool] | None:
    """The `_widen` extension's F16C conversion, where it was built (setup.py)."""
    path = extension_path("_widen")
    if path is None:
        return None
    function = ctypes.CDLL(str(path)).canary_widen_float16
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda source, target: bool(function(source.ctypes.data, target.ctypes.data, source.size))


def widened(view: np.ndarray, dtype: mx.Dtype, out: np.ndarray) -> np.ndarray:
    """The float32 values of float16 or bfloat16 bits (`view`, as stored), exactly, written into `out`.

    numpy shifts bfloat16 into float32's upper half at memory speed (12 GB/s here), but widens float16
    at 2.9 GB/s, and MLX at 1.7: the F16C instructions of the `_widen` extension are used where built.
    """
    if dtype == mx.bfloat16:
        np.left_shift(view, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    widen = _float16_widener()
    source = np.ascontiguousarray(view)
    if widen is None or not widen(source, out):
        out[...] = view
    return out


def map_safetensors(path: Path) -> dict[str, MappedTensor]:
    """Every tensor of a safetensors file, each checked to lie inside the file with its shape's size."""
    try:
        return _mapped(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"{path}: not a readable safetensors file: {exc}") from None


def _mapped(path: Path) -> dict[str, MappedTensor]:
    with path.open("rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        handle.seek(0)
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if 8 + length > size:
            raise ValueError(f"a header of {length} bytes does not fit in the file ({size} bytes)")
        header = json.loads(handle.read(length))
        # Mapped whole and populated at once (Linux; 0.2 s for 4 GB in the page cache): faulting the pages
        # in one by one on first use made the first pass over a canary-1b decoder 4x slower.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = np.frombuffer(mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ), dtype=np.uint8)
    start_of_data = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{name} has dtype {entry['dtype']}, which canary-convert never stores")
        numpy_dtype, mlx_dtype = _DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        expected = math.prod(shape) * np.dtype(numpy_dtype).itemsize
        if not 0 <= begin <= end <= size - start_of_data or end - begin != expected:
            raise ValueError(f"{name} ({entry['dtype']} {list(shape)}) at bytes {begin}-{end} does not fit the "
                             f"file's {size - start_of_data} bytes of data")
        view = mapping[start_of_data + begin: start_of_data + end].view(numpy_dtype).reshape(shape)
        tensors[name] = MappedTensor(view, mlx_dtype)
    return tensors
