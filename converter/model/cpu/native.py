"""Encoder kernels of the `_encoder` extension (native/*.c) for x86 CPUs, where MLX runs elementwise work on one
thread without wide vectors.

The subsampling's stride-2 3x3 convolutions (native/subsample.c): the first stages of NeMo's dw_striding
subsampling are nothing but elementwise work: on canary-180m-flash and 30 s of audio, the 1->C convolution,
its ReLU and the first depthwise convolution took 170 of the encoder's 1310 ms. The extension makes the first
convolution's rows as the depthwise one reads them (the (T/2, F/2, C) array is never written), with wide vectors,
on every core. The results are NeMo's up to the order of float32 sums. Where the extension was not built (no
C compiler at install) or MLX vectorises itself (ARM, a GPU), `available()` is False and the MLX layers run.

The relative-position attention after its projections (native/rel_softmax.c): NeMo's per-head products
(q+u)k^T, (q+v)p^T and the weights times v, with softmax((ac + rel_shift(bd)) / sqrt(d_k)) between them. In MLX
the heads are strided views its matmul copies before each product (7 of a parakeet-tdt-0.6b-v2 layer's 26 ms on
30 s went to (q+v)p^T alone) and the softmax was five passes (5.8 ms a layer on canary-180m-flash's 30 s). The
extension calls the BLAS's sgemm on the projections in place, keeps each head's scores in cache-sized buffers and
makes the softmax one vectorised pass per row on every core. Local attention too: each block of queries with its
band of keys, where MLX gathered the positional terms and masked outside the band (10 minutes: 43.6 -> 34.6 s).

SiLU and GLU (native/activations.c): the same formulas as activations.py's, vectorised and on every core, adding the
linear layer's bias on the way (MLX's addmm copies it into every row of the product first: 0.3 ms on (375, 4096)).
The FF's SiLU is written over its product's memory: copying 6 MB back into MLX took 0.4 ms.

The conv module's depthwise convolution, BatchNorm and SiLU (native/conv_module.c): k + 3 passes in MLX, one here.
LayerNorm (native/layer_norm.c): MLX's x86 kernel runs on one thread. With the residual sum before it
(add_layer_norm), a Conformer block's step from one module to the next is one pass instead of three.
"""

from __future__ import annotations

import ctypes
import functools
import os

import mlx.core as mx
import numpy as np

from ...blas import one_thread_each, product_functions
from ...extensions import FLOATS, INTS, extension_path, pointer
from .activations import slow_cpu



@functools.cache
def _library() -> ctypes.CDLL | None:
    path = extension_path("_encoder")
    if path is None:
        return None
    library = ctypes.CDLL(str(path))
    library.canary_subsample_stem.argtypes = [FLOATS, ctypes.c_int, ctypes.c_int, ctypes.c_int, INTS, INTS,
                                              FLOATS, FLOATS, FLOATS, FLOATS, ctypes.c_int, FLOATS, ctypes.c_int]
    library.canary_rel_attention.argtypes = [FLOATS, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS,
                                             ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                             ctypes.c_void_p, FLOATS, ctypes.c_int, ctypes.c_int]
    library.canary_silu.argtypes = [FLOATS, FLOATS, FLOATS, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    library.canary_glu.argtypes = [FLOATS, FLOATS, FLOATS, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    library.canary_silu.restype = library.canary_glu.restype = None
    library.canary_depthwise_bn_silu.argtypes = [FLOATS, ctypes.c_long, ctypes.c_long, ctypes.c_long, FLOATS,
                                                 ctypes.c_long, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS, ctypes.c_int]
    library.canary_depthwise_bn_silu.restype = None
    library.canary_layer_norm.argtypes = [FLOATS, ctypes.c_long, ctypes.c_long, FLOATS, FLOATS, ctypes.c_float,
                                          FLOATS, ctypes.c_int]
    library.canary_add_layer_norm.argtypes = [FLOATS, FLOATS, FLOATS, ctypes.c_float, FLOATS, ctypes.c_long,
                                              ctypes.c_long, FLOATS, FLOATS, ctypes.c_float, FLOATS, ctypes.c_int]
    library.canary_layer_norm.restype = library.canary_add_layer_norm.restype = None
    library.canary_relu_depthwise.argtypes = [FLOATS, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, INTS,
                                              FLOATS, FLOATS, FLOATS, ctypes.c_int]
    library.canary_rel_local_attention.argtypes = [FLOATS, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS,
                                                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_int, ctypes.c_float, ctypes.c_void_p, FLOATS, ctypes.c_int,
                                                   ctypes.c_int]
    for function in (library.canary_subsample_stem, library.canary_relu_depthwise, library.canary_rel_attention,
                     library.canary_rel_local_attention):
        function.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether these kernels run here (an x86 CPU and the extension built)."""
    return slow_cpu() and _library() is not None


def attention_available() -> bool:
    """Whether `rel_attention` runs here: the kernels, and an optimised BLAS (blas.py) for its products."""
    return available() and product_functions() is not None


def _floats(array: mx.array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array.astype(mx.float32)), dtype=np.float32)


def _taps(weight: mx.array) -> np.ndarray:
    """A (C, 3, 3, 1) kernel as (9, C), tap-major, for the C loops over contiguous channels."""
    return np.ascontiguousarray(_floats(weight).reshape(weight.shape[0], 9).T)


def _halved(size: int) -> int:
    return (size - 1) // 2 + 1


def _threads() -> int:
    return len(os.sched_getaffinity(0))



def stem(x: mx.array, valid: mx.array, mid_valid: mx.array, first: tuple[mx.array, mx.array],
         depthwise: tuple[mx.array, mx.array]) -> mx.array:
    """ReLU(conv 1->C 3x3/2) then the depthwise 3x3/2 conv: features x (B, T, F) -> (B, T/4, F/4, C) (each
    halving rounds up), in x's dtype. valid (B,): frames per sequence (later ones count as zeros); mid_valid
    (B,): the first convolution's rows per sequence. first, depthwise: (weight (C, 3, 3, 1), bias (C,))."""
    batch, frames, freq = x.shape
    channels = first[0].shape[0]
    features = _floats(x)
    valid_rows, mid_rows = (np.ascontiguousarray(np.asarray(v), dtype=np.int32) for v in (valid, mid_valid))
    weights = [_taps(first[0]), _floats(first[1]), _taps(depthwise[0]), _floats(depthwise[1])]
    out = np.empty((batch, _halved(_halved(frames)), _halved(_halved(freq)), channels), dtype=np.float32)
    failed = _library().canary_subsample_stem(
        pointer(features), batch, frames, freq, pointer(valid_rows, INTS), pointer(mid_rows, INTS),
        *(pointer(w) for w in weights), channels, pointer(out), _threads())
    if failed:
        raise MemoryError("the subsampling's native convolution could not allocate its row buffers")
    return mx.array(out).astype(x.dtype)


def relu_depthwise(y: mx.array, valid: mx.array, depthwise: tuple[mx.array, mx.array]) -> mx.array:
    """The depthwise 3x3/2 conv of ReLU(y): y (B, H, W, C) -> (B, H/2, W/2, C), in y's dtype; rows of sequence
    s at or past valid[s] count as zeros."""
    batch, height, width, channels = y.shape
    inputs = _floats(y)
    rows = np.ascontiguousarray(np.asarray(valid), dtype=np.int32)
    weight, bias = _taps(depthwise[0]), _floats(depthwise[1])
    out = np.empty((batch, _halved(height), _halved(width), channels), dtype=np.float32)
    _library().canary_relu_depthwise(pointer(inputs), batch, height, width, channels, pointer(rows, INTS),
                                     pointer(weight), pointer(bias), pointer(out),
                                     _threads())
    return mx.array(out).astype(y.dtype)


def rel_attention(q: mx.array, k: mx.array, v: mx.array, p: mx.array, bias_u: mx.array, bias_v: mx.array,
                  mask: mx.array | None, scale: float, context: tuple[int, int] | None = None) -> mx.array:
    """Each head's softmax(((q+u)k^T + rel_shift((q+v)p^T)) * scale + mask) v, products and softmax in float32:
    q, k, v (B, T, d) projections, p (1, P, d) projected positions, bias_u, bias_v (h, d/h); -> (B, T, d), each
    head's values in its own d/h columns, in q's dtype.

    Full attention (context None): P = 2T-1 offsets T-1 ... -(T-1), mask None or additive, broadcastable to
    (B, 1, T, T). Local attention, context (left, right): query i sees keys i-left ... i+right, P = left+right+1
    offsets left ... -right, mask None or additive per key, broadcastable to (B, 1, 1, T)."""
    batch, t, width = q.shape
    heads, d_head = bias_u.shape
    rows = [_floats(a) for a in (q, k, v, p, bias_u, bias_v)]
    masked = (batch, 1, t, t) if context is None else (batch, 1, 1, t)
    additive = None if mask is None else np.ascontiguousarray(np.broadcast_to(_floats(mask), masked))
    out = np.empty((batch, t, width), dtype=np.float32)
    library = _library()
    # The heads side by side, each thread multiplying on its own core, where the BLAS can be kept to one thread:
    # 4.7 against 6.7 ms for a parakeet-tdt-0.6b-v2 layer's 30 s, whose small products OpenBLAS threads poorly.
    with one_thread_each() as split:
        arrays = (*(pointer(a) for a in rows), _maybe(additive), batch, t, heads, d_head)
        tail = (scale, product_functions()[1], pointer(out), _threads(), int(split))
        if context is None:
            failed = library.canary_rel_attention(*arrays, *tail)
        else:
            failed = library.canary_rel_local_attention(*arrays, *context, *tail)
    if failed:
        raise MemoryError("the attention's native kernel could not allocate its score buffers")
    return mx.array(out).astype(q.dtype)


def _own_floats(x: mx.array) -> np.ndarray | None:
    """x's own buffer as a writable float32 array when x is float32 and row-contiguous (numpy shares MLX's memory),
    so a kernel can write its result over it rather than into a copy MLX then copies again; else None."""
    if x.dtype != mx.float32:
        return None
    values = np.asarray(x)
    return values if values.flags.c_contiguous and values.flags.writeable else None


def _optional(bias: mx.array | None) -> np.ndarray | None:
    return None if bias is None else _floats(bias)


def _maybe(array: np.ndarray | None) -> ctypes._Pointer | None:
    return None if array is None else pointer(array)


def silu(x: mx.array, bias: mx.array | None = None, overwrite: bool = False) -> mx.array:
    """x + bias (bias per last-axis column, or None) through torch's SiLU, x * sigmoid(x), in x's dtype. With
    `overwrite`, written over x's own memory where it is float32: x must be a fresh product nothing else holds (a
    linear layer's output computed without its bias), and the result is that array."""
    own = _own_floats(x) if overwrite else None
    values = own if own is not None else _floats(x)
    width = values.shape[-1]
    out = own if own is not None else np.empty_like(values)
    _library().canary_silu(pointer(values), _maybe(_optional(bias)), pointer(out),
                           values.size // width, width, _threads())
    return x if own is not None else mx.array(out).astype(x.dtype)


def glu(x: mx.array, bias: mx.array | None = None) -> mx.array:
    """torch's GLU over the last axis of x + bias (bias None, or per column: the kernel-1 convolution's that MLX did
    not add): first half times sigmoid of the second, in x's dtype."""
    values = _floats(x)
    d = values.shape[-1] // 2
    out = np.empty((*values.shape[:-1], d), dtype=np.float32)
    _library().canary_glu(pointer(values), _maybe(_optional(bias)), pointer(out),
                          values.size // (2 * d), d, _threads())
    return mx.array(out).astype(x.dtype)


def depthwise_bn_silu(x: mx.array, weight: mx.array, bias: mx.array | None, mean: mx.array, factor: mx.array,
                      shift: mx.array) -> mx.array:
    """SiLU((conv(x) - mean) * factor + shift) for x (B, T, C), conv the depthwise convolution over time with
    weight (C, k, 1), (k-1)/2 zeros each side, and bias (or None); in x's dtype."""
    batch, frames, channels = x.shape
    kernel = weight.shape[1]
    values = _floats(x)
    taps = np.ascontiguousarray(_floats(weight).reshape(channels, kernel).T)
    norm = [_floats(v) for v in (mean, factor, shift)]
    out = np.empty_like(values)
    _library().canary_depthwise_bn_silu(pointer(values), batch, frames, channels, pointer(taps), kernel,
                                        _maybe(_optional(bias)), *(pointer(v) for v in norm), pointer(out), _threads())
    return mx.array(out).astype(x.dtype)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """torch's LayerNorm over the last axis (biased variance), in x's dtype."""
    values = _floats(x)
    width = values.shape[-1]
    out = np.empty_like(values)
    _library().canary_layer_norm(pointer(values), values.size // width, width,
                                 pointer(_floats(weight)), pointer(_floats(bias)), eps,
                                 pointer(out), _threads())
    return mx.array(out).astype(x.dtype)


def add_layer_norm(residual: mx.array, update: mx.array, factor: float, weight: mx.array, bias: mx.array, eps: float,
                   update_bias: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """A Conformer block's residual step and the next LayerNorm in one pass: (residual + factor * (update +
    update_bias), its LayerNorm), in residual's dtype. factor 1 or 0.5 (exact products). The sum is written over
    `update`'s own memory where it is float32: update must be a fresh product nothing else holds."""
    own = _own_floats(update) if residual.dtype == mx.float32 else None
    values, updates = _floats(residual), own if own is not None else _floats(update)
    width = values.shape[-1]
    total = own if own is not None else np.empty_like(values)
    out = np.empty_like(values)
    _library().canary_add_layer_norm(
        pointer(values), pointer(updates), _maybe(_optional(update_bias)), factor, pointer(total),
        values.size // width, width, pointer(_floats(weight)), pointer(_floats(bias)), eps, pointer(out), _threads())
    summed = update if own is not None else mx.array(total).astype(residual.dtype)
    return summed, mx.array(out).astype(residual.dtype)
