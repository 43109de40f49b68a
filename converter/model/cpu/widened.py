"""Half-precision and quantized products multiplied in float32 where MLX's own kernels are scalar loops.

On an x86 CPU, MLX 0.32 runs float16/bfloat16 and quantized matrix products one element at a time (its
vectorised CPU kernels are ARM's): a canary-1b encoder product, (376, 1024) x (1024, 4096), takes
460-580 ms in half precision and 1040 ms at 8 bits, against 10-15 ms once the operands are widened to
float32 (or the weights dequantized) and OpenBLAS multiplies them. MLX's CPU kernels accumulate in float32
as well, so widening changes only the order of the sums. A quantized matrix-vector product (one row: a
decoder step) stays MLX's, which reads a quarter of the bytes and is faster there.

`widen_products` swaps a loaded model's layers for these subclasses; each checks the device at call time
and is its parent class on Apple silicon or a GPU, and for float32 operands.

Widening at every call costs more than the product itself when one row is multiplied (a decoding step): a
(1, 2048) x (2048, 6144) bfloat16 product took 112 ms widened per call, 22 ms in MLX's own kernel and 7 ms
with the weight held in float32. `hold_widened` therefore keeps a model's half-precision weights widened,
once, where memory allows (twice the bytes): the products are the same float32 products, and each layer's
output is rounded to the stored dtype as before, so the results are bit-identical to widening per call.
"""

from __future__ import annotations

from pathlib import Path

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


def dequantized(layer: nn.QuantizedLinear | nn.QuantizedEmbedding) -> mx.array:
    """A quantized layer's weight as the floats it stands for (in its scales' dtype)."""
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
    # The stored half-precision dtype of a table `hold_widened` keeps in float32: what its rows come out in.
    stored_dtype: mx.Dtype | None = None

    def __call__(self, x: mx.array) -> mx.array:
        rows = super().__call__(x)
        return rows if self.stored_dtype is None else rows.astype(self.stored_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        if not (slow_cpu() and (self["weight"].dtype in HALF or x.dtype in HALF)):
            return super().as_linear(x)
        return _widened_product(x, self["weight"])


class WidenedQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if not slow_cpu() or _rows(x) == 1:
            return super().__call__(x)
        return _widened_product(x, dequantized(self), self.get("bias"))


class WidenedQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        if not slow_cpu() or _rows(x) == 1:
            return super().as_linear(x)
        return _widened_product(x, dequantized(self))


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


def _available_bytes() -> int:
    """Memory the kernel could give now without swapping (Linux's MemAvailable); 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def hold_widened(model: nn.Module, share: float = 0.5) -> bool:
    """On a CPU whose half-precision kernels are scalar loops, replace the half-precision weights of the model's
    widening layers (`widen_products` first) by their float32 values, if those fit in `share` of the memory
    available now; returns whether it did."""
    layers = [layer for _, layer in model.named_modules()
              if isinstance(layer, (WidenedLinear, WidenedEmbedding)) and layer["weight"].dtype in HALF]
    needed = sum(layer["weight"].size * 4 for layer in layers)
    if not layers or not slow_cpu() or needed > share * _available_bytes():
        return False
    for layer in layers:
        if isinstance(layer, WidenedEmbedding):
            layer.stored_dtype = layer["weight"].dtype
        # One layer at a time, evaluated, so its half-precision copy is let go before the next is widened
        # (MLX's conversion: 21 ms for 12.6M weights here, faster than numpy's shift and a copy into MLX).
        layer["weight"] = layer["weight"].astype(mx.float32)
        mx.eval(layer["weight"])
    return True
