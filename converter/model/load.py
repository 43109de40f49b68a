"""Load a converted MLX folder into the bundled model, strictly: every parameter present, every shape right."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import TypeVar

import mlx.core as mx
from mlx.utils import tree_flatten

from .aed.canary import CanaryModel
from ..errors import ModelFolderError
from .config import ModelConfig
from .cpu.mapped import MappedTensor, map_safetensors
from .quantized import quantize_modules
from .cpu.widened import widen_products
from .tokenizer import load_tokenizer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Stored = TypeVar("Stored", mx.array, MappedTensor)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an MLX folder, from its index when sharded (mlx-lm's layout)."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return [folder / SINGLE_FILE]


def tensor_files(folder: Path, config: ModelConfig) -> list[Path]:
    """Every file of tensors the bundled model reads: the weight files, and another layout's side files."""
    side = config.layout.side_files if config.layout is not None else []
    return weight_files(folder) + [folder / name for name in side]


def _under_model_names(config: ModelConfig, tensors: dict[str, Stored]) -> dict[str, Stored]:
    """Stored tensors under the bundled model's names (another layout's names renamed, as recorded)."""
    if config.layout is None:
        return tensors
    rename = config.layout.rename
    if unknown := sorted(set(tensors) - set(rename)):
        raise ValueError(f"{len(unknown)} stored tensor(s) the {config.layout.name} layout does not list: {unknown[0]}")
    return {rename[key]: value for key, value in tensors.items() if rename[key] is not None}


def read_tensors(folder: Path, config: ModelConfig) -> dict[str, mx.array]:
    """The folder's tensors under the bundled model's names, as lazy arrays: each is read when evaluated."""
    tensors: dict[str, mx.array] = {}
    for file in tensor_files(folder, config):
        tensors.update(mx.load(str(file), format="safetensors"))
    return _under_model_names(config, tensors)


def mapped_tensors(folder: Path, config: ModelConfig) -> dict[str, MappedTensor]:
    """The folder's tensors under the bundled model's names, as views of the mapped files."""
    tensors: dict[str, MappedTensor] = {}
    for file in tensor_files(folder, config):
        tensors.update(map_safetensors(file))
    return _under_model_names(config, tensors)


def parameter_shapes(config: ModelConfig, quantized: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """Every parameter the model built from `config` has, with its shape (MLX allocates lazily: no cost).

    With a quantized config, the modules named in `quantized` take their quantized form first, so the
    shapes are those of the stored weight, scales and biases.
    """
    model = CanaryModel(config)
    if config.quantization is not None:
        quantize_modules(model, config.quantization, {f"{path}.scales" for path in quantized})
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def load_model(path: str | Path) -> CanaryModel:
    """Build the model from `config.json` and load its weights with strict checking, in inference mode."""
    folder = Path(path)
    try:
        config = ModelConfig.from_file(folder / CONFIG_FILE)
        model = CanaryModel(config, load_tokenizer(folder, config.tokenizer))
        weights = read_tensors(folder, config)
        if config.quantization is not None:
            quantize_modules(model, config.quantization, weights.keys())
        model.load_weights(list(weights.items()), strict=True)
        widen_products(model)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelFolderError(f"{folder}: not a loadable canary-convert MLX folder: {exc}") from None
    model.eval()
    return model
