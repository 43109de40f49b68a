"""The quantizer: which layers `--quantize` stores quantized, the parts it stores, and each layer's error.

The mapping file lists the quantizable weights (Linear and Embedding layers); a listed weight whose
input width the group size divides is quantized with MLX's own `mx.quantize`, so the stored
`weight`/`scales`/`biases` are exactly what MLX's quantized layers load. Other listed weights stay in
float and are named in config.json, as mlx-lm does for per-module overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from .errors import MappingError, UsageError
from .model.quantized import QuantizeOptions, quantization_record
from .rules import Plan, TensorPlan

WEIGHT_SUFFIX = ".weight"
_MX_DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def quantize_options(bits: int | None, group_size: int | None, mode: str) -> QuantizeOptions | None:
    """The command line's `--quantize/--q-group-size/--q-mode`, checked against mx.quantize's rules."""
    if bits is None:
        if group_size is not None or mode != "affine":
            raise UsageError("--q-group-size and --q-mode need --quantize 4 or 8")
        return None
    if bits not in (4, 8):
        raise UsageError(f"--quantize {bits}: choose 4 or 8 bits")
    try:
        return QuantizeOptions.create(bits, group_size, mode)
    except ValueError as exc:
        raise UsageError(f"--quantize {bits} --q-mode {mode}: {exc}") from None


@dataclass(frozen=True)
class QuantizationPlan:
    """Which layers are stored quantized (by module path) and which quantizable ones stay in float."""

    options: QuantizeOptions
    quantized: frozenset[str]
    kept_float: frozenset[str]

    def record(self) -> dict[str, object]:
        """config.json's "quantization" (and "quantization_config") entry."""
        return quantization_record(self.options, self.kept_float)

    def quantizes(self, tensor: TensorPlan) -> bool:
        return tensor.target_key.endswith(WEIGHT_SUFFIX) and module_path(tensor.target_key) in self.quantized


def module_path(weight_key: str) -> str:
    return weight_key[: -len(WEIGHT_SUFFIX)]


def plan_quantization(plan: Plan, options: QuantizeOptions) -> QuantizationPlan:
    """Quantize every weight the mapping lists whose last (input) dimension the group size divides."""
    quantized, kept = set(), set()
    for tensor in plan.tensors:
        if plan.mapping.is_quantizable(tensor.target_key):
            fits = tensor.target_shape[-1] % options.group_size == 0
            (quantized if fits else kept).add(module_path(tensor.target_key))
    return QuantizationPlan(options, frozenset(quantized), frozenset(kept))


def part_shapes(shape: tuple[int, ...], options: QuantizeOptions) -> dict[str, tuple[int, ...]]:
    """The stored parts of a quantized (..., in) weight: `bits`-wide codes packed into uint32 words, and one
    scale (and, for affine, one bias) per group of `group_size` inputs."""
    *lead, width = shape
    parts = {"weight": (*lead, width * options.bits // 32), "scales": (*lead, width // options.group_size)}
    if options.has_biases:
        parts["biases"] = parts["scales"]
    return parts


def part_dtypes(dtype: torch.dtype, options: QuantizeOptions) -> dict[str, mx.Dtype]:
    """The dtype of each stored part when quantizing from `dtype`, as mx.quantize itself gives them (affine
    scales keep the weight's dtype; the floating-point modes store 8-bit shared scales)."""
    probe = mx.quantize(mx.zeros((32, 128), dtype=_MX_DTYPES[dtype]), group_size=options.group_size,
                        bits=options.bits, mode=options.mode)
    return {part: array.dtype for part, array in zip(("weight", "scales", "biases"), probe)}


def quantize_tensor(plan: TensorPlan, source: torch.Tensor, dtype: torch.dtype,
                    options: QuantizeOptions) -> dict[str, mx.array]:
    """mx.quantize of the source weight in the MLX layout, cast to `dtype` first (the scales keep that dtype)."""
    weight = mx.array(plan.convert(source, torch.float32).numpy()).astype(_MX_DTYPES[dtype])
    parts = mx.quantize(weight, group_size=options.group_size, bits=options.bits, mode=options.mode)
    return dict(zip(("weight", "scales", "biases"), parts))


def dequantize(parts: Mapping[str, mx.array], options: QuantizeOptions) -> mx.array:
    return mx.dequantize(parts["weight"], parts["scales"], parts.get("biases"), group_size=options.group_size,
                         bits=options.bits, mode=options.mode)


@dataclass(frozen=True)
class QuantizationError:
    """How far a stored quantized weight, dequantized, is from its float32 source."""

    key: str
    max_abs: float
    rel_l2: float

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "max_abs": self.max_abs, "rel_l2": self.rel_l2}


def quantization_error(key: str, parts: Mapping[str, mx.array], source: np.ndarray,
                       options: QuantizeOptions) -> QuantizationError:
    restored = np.array(dequantize(parts, options).astype(mx.float32))
    difference = restored - source
    norm = float(np.linalg.norm(source))
    return QuantizationError(key, float(np.abs(difference).max()),
                             float(np.linalg.norm(difference) / norm) if norm else 0.0)


def check_quantized_tree(stored: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Prove the stored tensors (name -> shape) are exactly the quantized model's parameters with their shapes."""
    problems = [f"{key}: stored {shape}, the quantized MLX model expects {expected.get(key)}"
                for key, shape in sorted(stored.items()) if expected.get(key) != shape]
    problems += [f"{key}: the quantized MLX model expects it, nothing stores it" for key in sorted(set(expected) - set(stored))]
    if problems:
        raise MappingError("quantized layout does not fit the MLX model: " + "; ".join(problems[:12]))
