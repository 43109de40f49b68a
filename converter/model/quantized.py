"""Quantized MLX folders: the settings `config.json` records and how the bundled model reads them.

The convention is mlx-lm's: `"quantization": {"group_size", "bits", "mode"}` (mirrored as
`"quantization_config"`), plus one entry per module path that stays in float (`"path": false`). Which
modules a folder quantizes is read from the folder itself (a `<module>.scales` tensor beside its weight),
so the loader needs no list of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

# mx.quantize's rules in MLX 0.32: affine takes any of these bits and group sizes; each floating-point
# mode has one element width and one block size (mxfp: 32-element blocks, nvfp4: 16).
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
MODES = ("affine", *FLOAT_MODES)
DEFAULT_GROUP_SIZE = 64
_SETTINGS = ("group_size", "bits", "mode")


@dataclass(frozen=True)
class QuantizeOptions:
    """How weights are quantized: bits per weight, weights per scale (group), and MLX's mode."""

    bits: int
    group_size: int
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise ValueError(f"affine quantization takes {', '.join(map(str, AFFINE_BITS))} bits, not {self.bits}")
            if self.group_size not in AFFINE_GROUP_SIZES:
                raise ValueError(f"affine quantization takes group sizes {', '.join(map(str, AFFINE_GROUP_SIZES))}, "
                                 f"not {self.group_size}")
        elif self.mode in FLOAT_MODES:
            bits, group = FLOAT_MODES[self.mode]
            if (self.bits, self.group_size) != (bits, group):
                raise ValueError(f"{self.mode} quantizes to {bits} bits in groups of {group}, "
                                 f"not {self.bits} bits in groups of {self.group_size}")
        else:
            raise ValueError(f"quantization mode {self.mode!r}: choose one of {', '.join(MODES)}")

    @classmethod
    def create(cls, bits: int, group_size: int | None = None, mode: str = "affine") -> QuantizeOptions:
        """Options with the mode's own group size when none is asked for (affine: 64)."""
        if group_size is None:
            group_size = FLOAT_MODES[mode][1] if mode in FLOAT_MODES else DEFAULT_GROUP_SIZE
        return cls(bits=bits, group_size=group_size, mode=mode)

    @property
    def has_biases(self) -> bool:
        """Affine groups store a scale and a bias; the floating-point modes a shared exponent only."""
        return self.mode == "affine"

    def to_dict(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def quantization_record(options: QuantizeOptions, kept_float: Collection[str]) -> dict[str, Any]:
    """config.json's "quantization" entry: the settings, then each quantizable module kept in float."""
    record: dict[str, Any] = options.to_dict()
    record.update({path: False for path in sorted(kept_float)})
    return record


def read_quantization(record: Mapping[str, Any]) -> tuple[QuantizeOptions, set[str]]:
    """The settings and the float-kept module paths of a config.json "quantization" entry."""
    try:
        options = QuantizeOptions(bits=int(record["bits"]), group_size=int(record["group_size"]),
                                  mode=str(record.get("mode", "affine")))
    except KeyError as exc:
        raise ValueError(f"quantization entry lacks {exc.args[0]!r}") from None
    kept = {path for path, value in record.items() if path not in _SETTINGS and value is False}
    return options, kept


def quantize_modules(model: nn.Module, record: Mapping[str, Any], weight_names: Collection[str]) -> None:
    """Turn the model's Linear/Embedding layers into their quantized forms where the folder stores them so.

    A module is quantized when its `.scales` tensor is present and the record does not keep it in float;
    the strict load that follows then proves every stored tensor found its place.
    """
    options, kept = read_quantization(record)

    def stored_quantized(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and path not in kept and f"{path}.scales" in weight_names

    nn.quantize(model, options.group_size, options.bits, mode=options.mode, class_predicate=stored_quantized)
