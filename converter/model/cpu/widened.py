"""Half-precision and quantized products multiplied in float32 where MLX's own kernels are scalar loops.

On an x86 CPU, MLX 0.32 runs float16/bfloat16 and quantized matrix products one element at a time (its
vectorised CPU kernels are ARM's): a canary-1b encoder product, (376, 1024) x (1024, 4096), takes
460-580 ms in half precision and 1040 ms at 8 bits, against 10-15 ms once the operands are widened to
float32 (or the weights dequantized) and OpenBLAS multiplies them. MLX's CPU kernels accumulate in float32
as well, so widening changes only the order of the sums. A quantized matrix-vector product (one row: a
decoder step) stays MLX's, which reads a quarter of the bytes and is faster there.

`widen_products` swaps a loaded model's layers for these subclasses; each checks the device at call time
and is its parent class on Apple silicon or a GPU, and for float32 operands.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .activations import HALF, slow_cpu


def _widened_product(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias) computed in float32 (weight (out, in), already float), in x's dtype."""
    out = x.astype(mx.float32) @ weight.astype(mx.float32).T
    if bias is not None:
        out = out + bias.astype(mx.float32)
    return out.astype(x.dtype)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias) as nn.Linear computes it (one addmm), widened to float32 where a half-precision
    product would be MLX's scalar loop; for layers kept in other shapes, such as kernel-1 convolutions."""
    if slow_cpu() and (weight.dtype in HALF or x.dtype in HALF):
        return _widened_product(x, weight, bias)
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def _dequantized(layer: nn.QuantizedLinear | nn.QuantizedEmbedding) -> mx.array:
    return mx.dequantize(layer["weight"], scales=layer["scales"], biases=layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


class WidenedLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        # A float32 weight under half-precision x was widened ahead, exactly (streaming.py, the goldens).
        if not (slow_cpu() and (self["weight"].dtype in HALF or x.dtype in HALF)):
            return super().__call__(x)
        return _widened_product(x, self["weight"], self.get("bias"))


class WidenedEmbedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if not (slow_cpu() and self["weight"].dtype in HALF):
            return super().as_linear(x)
        return _widened_product(x, self["weight"])


class WidenedQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not slow_cpu() or _rows(x) == 1:
            return super().__call__(x)
        return _widened_product(x, _dequantized(self), self.get("bias"))


class WidenedQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if not slow_cpu() or _rows(x) == 1:
            return super().as_linear(x)
        return _widened_product(x, _dequantized(self))


def _widened(layer: nn.Module) -> nn.Module:
    """The same layer, with the same arrays, as its widening subclass (the classes' own fresh weights are
    replaced before they are ever computed)."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer["weight"].shape
        widened = WidenedQuantizedLinear(packed * 32 // layer.bits, out_dims, "bias" in layer, layer.group_size,
                                         layer.bits, layer.mode)
    elif isinstance(layer, nn.QuantizedEmbedding):
        rows, packed = layer["weight"].shape
        widened = WidenedQuantizedEmbedding(rows, packed * 32 // layer.bits, layer.group_size, layer.bits, layer.mode)
    elif isinstance(layer, nn.Linear):
        out_dims, in_dims = layer["weight"].shape
        widened = WidenedLinear(in_dims, out_dims, "bias" in layer)
    elif isinstance(layer, nn.Embedding):
        widened = WidenedEmbedding(*layer["weight"].shape)
    else:
        return layer
    widened.update(layer.parameters())
    return widened


def widen_products(model: nn.Module) -> None:
    """Swap the model's half-precision and quantized Linear/Embedding layers for their widening forms."""

    def swap(path: str, layer: nn.Module) -> nn.Module:
        quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        half = isinstance(layer, (nn.Linear, nn.Embedding)) and layer["weight"].dtype in HALF
        return _widened(layer) if quantized or half else layer

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
