"""The `_label_looping` extension (native/label_looping.c): NeMo's greedy label-looping transducer decoding, the
whole loop in C, for x86 CPUs.

In MLX each joint call and prediction-network step of that loop is a graph of small operations and a host round
trip, which on an x86 CPU costs twice the products themselves. The C loop multiplies with the BLAS that MLX was
given (blas.py), from float32 copies of the prediction network and joint (8-bit layers dequantized: MLX's
quantized kernels are scalar loops on x86), prepared once per model, and follows NeMo's batch rules exactly.
Where the extension or an optimised BLAS is missing, or a layer computes in half precision, `network()` returns
None and model/transducer/decoding.py's MLX loop runs.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...blas import product_functions
from ...extensions import FLOATS, INTS, extension_path, pointer
from .activations import slow_cpu
from .widened import dequantized

_FLOAT_TABLE = ctypes.POINTER(FLOATS)
# native/label_looping.c's activation codes, in NeMo's RNNTJoint names.
_ACTIVATIONS = {"relu": 0, "sigmoid": 1, "tanh": 2}
_TOO_MANY_LABELS = 2
_STATUS = {1: "could not allocate its buffers", _TOO_MANY_LABELS: "found more labels than max_symbols allows"}


class _Network(ctypes.Structure):
    """native/label_looping.c's Network, field for field."""

    _fields_ = [("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("joint_hidden", ctypes.c_int),
                ("outputs", ctypes.c_int), ("tokens", ctypes.c_int), ("duration_count", ctypes.c_int),
                ("duration_values", INTS), ("activation", ctypes.c_int), ("first_input", FLOATS),
                ("input_weight", _FLOAT_TABLE), ("input_bias", _FLOAT_TABLE), ("hidden_weight", _FLOAT_TABLE),
                ("hidden_bias", _FLOAT_TABLE), ("pred_weight", FLOATS), ("pred_bias", FLOATS),
                ("net_weight", FLOATS), ("net_bias", FLOATS), ("sgemv", ctypes.c_void_p),
                ("sgemm", ctypes.c_void_p)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = extension_path("_label_looping")
    if path is None:
        return None
    library = ctypes.CDLL(str(path))
    library.canary_label_looping.argtypes = [ctypes.POINTER(_Network), FLOATS, ctypes.c_int, ctypes.c_int, INTS,
                                             ctypes.c_int, ctypes.c_int, ctypes.c_int, INTS, INTS, INTS, INTS]
    library.canary_label_looping.restype = ctypes.c_int
    return library


def _float32(layer: nn.Module, name: str = "weight") -> np.ndarray | None:
    """A layer's weight (dequantized) or bias as a contiguous float32 array, or None if it computes in half
    precision (then this loop would not give the MLX loop's numbers)."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and name == "weight":
        if layer["scales"].dtype != mx.float32:
            return None
        value = dequantized(layer)
    else:
        value = layer.get(name)
    if value is None or value.dtype != mx.float32:
        return None
    return np.ascontiguousarray(np.asarray(value), dtype=np.float32)


@dataclass
class PreparedNetwork:
    """The C loop's view of a prediction network and joint; `arrays` keeps the memory it points into alive."""

    network: _Network
    arrays: list = field(repr=False)


@dataclass(frozen=True)
class _Cached:
    """What `network` made of a model, and the parameter arrays it made it from (kept on the prediction network
    as a plain attribute: a model whose weights were replaced is prepared again)."""

    parameters: list[mx.array]
    prepared: PreparedNetwork | None



def _prepare(prediction: nn.Module, joint: nn.Module, durations: list[int],
             activation: str) -> PreparedNetwork | None:
    blas = product_functions()
    layers = prediction.lstm
    dense = [_float32(layer, name) for layer in (joint.pred, joint.net) for name in ("weight", "bias")]
    stacks = [[_float32(layer.input, name) for layer in layers[1:]] for name in ("weight", "bias")]
    stacks += [[_float32(layer.hidden, name) for layer in layers] for name in ("weight", "bias")]
    if blas is None or any(array is None for array in dense + sum(stacks, [])):
        return None
    tokens = prediction.embed.weight.shape[0]
    # Layer 0's input product for every label, as the MLX loop's first Linear computes it.
    first = layers[0].input(prediction.embed(mx.arange(tokens)))
    if first.dtype != mx.float32:
        return None
    first_input = np.ascontiguousarray(np.asarray(first), dtype=np.float32)
    values = np.asarray(durations or [0], dtype=np.int32)
    arrays = [first_input, values, *dense, *sum(stacks, [])]
    input_weight, input_bias, hidden_weight, hidden_bias = (
        (FLOATS * len(layers))(*([None] * (len(layers) - len(stack)) + [pointer(a) for a in stack]))
        for stack in stacks)
    pred_weight, pred_bias, net_weight, net_bias = (pointer(array) for array in dense)
    network = _Network(len(layers), prediction.hidden_size, joint.pred.bias.shape[0], dense[2].shape[0],
                       tokens, len(durations), pointer(values, INTS), _ACTIVATIONS[activation],
                       pointer(first_input), input_weight, input_bias, hidden_weight, hidden_bias, pred_weight,
                       pred_bias, net_weight, net_bias, blas[0], blas[1])
    # The pointer tables are ctypes arrays: kept with the structure that points at them.
    return PreparedNetwork(network, arrays + [input_weight, input_bias, hidden_weight, hidden_bias])


def network(prediction: nn.Module, joint: nn.Module, durations: list[int]) -> PreparedNetwork | None:
    """The prediction network and joint prepared for the C loop (once per model's weights), or None where the
    MLX loop must run."""
    if not slow_cpu() or _library() is None:
        return None
    parameters = [array for _, array in tree_flatten(prediction.parameters()) + tree_flatten(joint.parameters())]
    cached: _Cached | None = getattr(prediction, "_label_looping", None)
    if cached is not None and len(cached.parameters) == len(parameters) and all(
            old is new for old, new in zip(cached.parameters, parameters)):
        return cached.prepared
    prepared = _prepare(prediction, joint, durations, joint.activation_name)
    prediction._label_looping = _Cached(parameters, prepared)
    return prepared


def decode(prepared: PreparedNetwork, enc_projected: mx.array, lengths: mx.array, blank: int,
           max_symbols: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy label looping over (B, T, joint_hidden) projected encoder states: per row, its labels, the frame
    of each and (TDT) their durations."""
    enc = np.ascontiguousarray(np.asarray(enc_projected.astype(mx.float32)), dtype=np.float32)
    valid = np.ascontiguousarray(np.asarray(lengths), dtype=np.int32)
    batch, frames = enc.shape[:2]
    # Room for two labels per frame at first (speech has fewer); a run that needs more is made again with more,
    # up to max_symbols per frame, so the buffers grow with what the model emits, not with the bound.
    most = max(frames, 1) * max_symbols
    capacity = min(2 * max(frames, 1), most)
    while True:
        labels, label_frames, durations = (np.zeros((batch, capacity), dtype=np.int32) for _ in range(3))
        counts = np.zeros(batch, dtype=np.int32)
        status = _library().canary_label_looping(
            ctypes.byref(prepared.network), pointer(enc), batch, frames, pointer(valid, INTS), blank,
            max_symbols, capacity, pointer(labels, INTS), pointer(label_frames, INTS),
            pointer(durations, INTS), pointer(counts, INTS))
        if status != _TOO_MANY_LABELS or capacity == most:
            break
        capacity = min(4 * capacity, most)
    if status:
        raise RuntimeError(f"the native transducer decoding {_STATUS.get(status, f'failed ({status})')}")
    return [(labels[row, :n].tolist(), label_frames[row, :n].tolist(), durations[row, :n].tolist())
            for row, n in enumerate(counts.tolist())]
