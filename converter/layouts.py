"""Other libraries' models, for `--layout`: the parameter tree a folder in their layout must fill exactly.

Mapping files and presets say everything else about a layout as data; building the library's own model
(to read its parameter names and shapes) is the one thing that takes code per library.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CanaryConvertError, UnsupportedModelError
from .model.quantized import read_quantization


class LayoutUnavailableError(CanaryConvertError):
    """The library a layout is written for is not installed, so the folder cannot be proven to fit it."""


def _not_installed(layout: str, model: str, exc: ImportError) -> LayoutUnavailableError:
    """The layout's library is missing: the extra of the same name installs it."""
    return LayoutUnavailableError(f"--layout {layout} proves the folder against {model}, which is not installed "
                                  f"({exc}): pip install 'canary-convert[{layout}]'")


def _mlx_audio_canary(config: dict[str, Any]) -> nn.Module:
    try:
        from mlx_audio.stt.models.canary.canary import Model
        from mlx_audio.stt.models.canary.config import ModelConfig
    except ImportError as exc:
        raise _not_installed("mlx-audio", "mlx-audio's own Canary model", exc) from None
    return Model(ModelConfig.from_dict(config))


def _parakeet_mlx(config: dict[str, Any]) -> nn.Module:
    try:
        from parakeet_mlx.utils import from_config
    except ImportError as exc:
        raise _not_installed("parakeet-mlx", "parakeet-mlx's own model", exc) from None
    try:  # it picks its class from `target` and model_defaults.tdt_durations, and reads its sections by dacite
        return from_config(config)
    except Exception as exc:  # dacite's and its own errors share no base class
        raise UnsupportedModelError(f"--layout parakeet-mlx: parakeet-mlx cannot build a model from the derived "
                                     f"config.json: {type(exc).__name__}: {exc}") from None


_MODELS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"mlx-audio": _mlx_audio_canary,
                                                              "parakeet-mlx": _parakeet_mlx}


def library_parameter_shapes(layout: str, config_json: Mapping[str, Any],
                             quantized: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """Every parameter of the library's model built from `config_json`, with its shape (the modules in
    `quantized` in their quantized form, as the config's "quantization" entry says)."""
    model = _MODELS[layout](dict(config_json))
    record = config_json.get("quantization")
    if record is not None:
        options, _ = read_quantization(record)
        nn.quantize(model, options.group_size, options.bits, mode=options.mode,
                    class_predicate=lambda path, module: path in quantized)
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
