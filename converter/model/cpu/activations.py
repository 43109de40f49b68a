"""exp-based functions (sigmoid, SiLU, softmax, attention) and products that stay fast on MLX's x86 CPU backend.

MLX vectorises its CPU kernels only on ARM; on x86 it evaluates exp one element at a time (about 20 ns
each), which made sigmoid, SiLU and softmax a third of a canary-1b encoder layer. There, exp is built
here from operations the backend does vectorise (multiply-add, floor, an integer shift) and fused by
mx.compile: e**x = 2**n * 2**f with n = round(x / ln 2) and |f| <= 1/2, 2**f from its Taylor series to
degree 7 (truncation error below 1e-8, so float32 rounding dominates). Everywhere else MLX's own
functions are used.

Products of half-precision activations (attention scores, the encoder's positional term) are widened to
float32 on such a CPU for the same reason as `widened.py`'s layers: MLX's x86 half-precision matmul is a
scalar loop, 15-40 times slower than OpenBLAS in float32, and it accumulates in float32 too.
"""

from __future__ import annotations

import math
import platform

import mlx.core as mx
import mlx.nn as nn

# 2**f = sum over k of (f ln 2)**k / k!, highest power first for Horner's rule.
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7, -1, -1)]
# Beyond these, float32 e**x is 0 or overflows.
_EXP_LOW, _EXP_HIGH = -88.0, 88.0
_ROUNDER = 1.5 * 2**23
HALF = (mx.float16, mx.bfloat16)


def _composed_exp(x: mx.array) -> mx.array:
    """e**x in float32 from vectorised operations; exactly 0 below about e**-87.3 (masked scores stay 0)."""
    x = x.astype(mx.float32)
    clipped = mx.clip(x, _EXP_LOW, _EXP_HIGH)
    scaled = clipped * (1 / math.log(2))
    # Round to the nearest integer by adding and subtracting 1.5 * 2**23: x86's baseline vector set has no
    # floor, which made mx.floor a per-element call (a third of this function's time).
    whole = (scaled + _ROUNDER) - _ROUNDER
    fraction = scaled - whole
    power = _EXP2_TAYLOR[0]
    for coefficient in _EXP2_TAYLOR[1:]:
        power = power * fraction + coefficient
    # 2**whole assembled as a float32 bit pattern: biased exponent (whole + 127) in bits 23-30; at or below
    # 0 (whole <= -127) the pattern is kept at 0, which is the float 0.
    biased = mx.maximum(whole.astype(mx.int32) + 127, 0)
    return mx.left_shift(biased, 23).view(mx.float32) * power


@mx.compile
def _composed_sigmoid(x: mx.array) -> mx.array:
    return (1 / (1 + _composed_exp(-x))).astype(x.dtype)


@mx.compile
def _composed_silu(x: mx.array) -> mx.array:
    return (x / (1 + _composed_exp(-x))).astype(x.dtype)


@mx.compile
def _composed_softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32."""
    x = x.astype(mx.float32)
    weights = _composed_exp(x - mx.max(x, axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def slow_cpu() -> bool:
    """Whether MLX runs on a CPU whose kernels it does not vectorise (anything but ARM)."""
    return mx.default_device() == mx.cpu and platform.machine().lower() not in ("arm64", "aarch64")


def sigmoid(x: mx.array) -> mx.array:
    return _composed_sigmoid(x) if slow_cpu() else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) (torch's SiLU, NeMo's Swish)."""
    return _composed_silu(x) if slow_cpu() else nn.silu(x)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """softmax(q k^T * scale + mask) v over (B, heads, L, d_head) arrays; mask additive, broadcastable.

    MLX's fused attention where MLX vectorises exp; elsewhere the same product with the composed softmax
    (the fused attention would fall back to MLX's per-element softmax there). The softmax is in float32,
    and there the products too.
    """
    if not slow_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = product(q * scale, k.swapaxes(-1, -2))
    if mask is not None:
        scores = scores + mask
    return product(_composed_softmax(scores), v).astype(v.dtype)


def product(a: mx.array, b: mx.array) -> mx.array:
    """a @ b; in float32 on a slow CPU when either operand is half precision (the result is then float32)."""
    if slow_cpu() and (a.dtype in HALF or b.dtype in HALF):
        return a.astype(mx.float32) @ b.astype(mx.float32)
    return a @ b
