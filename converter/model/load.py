"""Load a converted MLX folder into the bundled model, strictly: every parameter present, every shape right."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .aed.canary import CanaryModel
from ..blas import warn_if_slow
from .llm.config import SpeechLLMConfig
from .llm.speechllm import SpeechLLM, load_speech_llm
from .ctc.model import CTCModel
from .transducer.model import TransducerModel
from ..errors import ModelFolderError
from .config import SpeechConfig
from .speech import SpeechModel
from .cpu.mapped import MappedTensor, map_safetensors
from .quantized import quantize_modules
from .cpu.widened import widen_products
from .tokenizer import load_tokenizer, tokenizer_files
from ..untrusted import folder_dir, folder_file, read_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Stored = TypeVar("Stored", mx.array, MappedTensor)

# config.json's `model_type` -> the bundled model class that runs it (each class names its config class).
# A new family adds one entry here, a preset (configs/), a mapping (mappings/) and a head package.
MODEL_TYPES: dict[str, type[SpeechModel]] = {
    "canary": CanaryModel,
    "ctc": CTCModel,
    "transducer": TransducerModel,
}


def model_class(model_type: str) -> type[SpeechModel]:
    """The bundled model class for a `model_type`; ValueError names the known ones."""
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}: this canary-convert runs "
                         f"{', '.join(sorted(MODEL_TYPES))}") from None


def config_from_dict(data: dict[str, Any]) -> SpeechConfig:
    """The config.json of any family, as its model class's config dataclass."""
    return model_class(str(data.get("model_type"))).config_class.from_dict(data)


def read_config(path: Path) -> SpeechConfig:
    """A folder's `config.json` (the file's path), as its family's config dataclass; ModelFolderError names
    the file and what is wrong (the folder may come from anywhere: read bounded)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: not a JSON object")
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as exc:  # TypeError: a foreign_keys entry that cannot be a key
        raise ModelFolderError(f"{path}: {exc}") from None


def _sharded(folder: Path) -> bool:
    return (folder / INDEX_FILE).exists() or (folder / INDEX_FILE).is_symlink()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an MLX folder, from its index when sharded (mlx-lm's layout); each a regular
    file inside the folder (untrusted.py: an index may name any path)."""
    index = folder / INDEX_FILE
    if not _sharded(folder):
        return [folder_file(folder, SINGLE_FILE)]
    data = read_json(folder_file(folder, INDEX_FILE))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFolderError(f"{index}: `weight_map` is not an object of tensor names to file names")
    return [folder_file(folder, name, INDEX_FILE) for name in sorted(set(weight_map.values()))]


def tensor_files(folder: Path, config: SpeechConfig) -> list[Path]:
    """Every file of tensors the bundled model reads: the weight files, and another layout's side files."""
    side = config.layout.side_files if config.layout is not None else []
    return weight_files(folder) + [folder_file(folder, name, f"{CONFIG_FILE} layout.side_files") for name in side]


def files_read(folder: Path, config: SpeechConfig) -> list[Path]:
    """Every file of the folder `load_model` reads: what verify must find in the manifest."""
    index = [folder / INDEX_FILE] if _sharded(folder) else []
    tokenizer = [folder_file(folder, name, f"{CONFIG_FILE} tokenizer") for name in tokenizer_files(config.tokenizer)]
    return [folder / CONFIG_FILE, *index, *tensor_files(folder, config), *tokenizer]


def _under_model_names(config: SpeechConfig, tensors: dict[str, Stored]) -> dict[str, Stored]:
    """Stored tensors under the bundled model's names (another layout's names renamed, as recorded)."""
    if config.layout is None:
        return tensors
    rename = config.layout.rename
    if unknown := sorted(set(tensors) - set(rename)):
        raise ValueError(f"{len(unknown)} stored tensor(s) the {config.layout.name} layout does not list: {unknown[0]}")
    renamed = {rename[key]: value for key, value in tensors.items() if rename[key] is not None}
    for name, shape in config.layout.reshape.items():
        if name not in renamed:
            raise ValueError(f"layout.reshape: {name}, which the folder does not hold")
        renamed[name] = _reshaped(name, renamed[name], tuple(shape))
    for name, into in config.layout.added.items():
        if into not in renamed:
            raise ValueError(f"layout.added: {name} is added into {into}, which the folder does not hold")
        renamed[name] = _zeros_like(renamed[into])
    return renamed


def _reshaped(name: str, tensor: Stored, shape: tuple[int, ...]) -> Stored:
    """The same elements in the bundled model's shape (lazy array or mapped view alike)."""
    stored = tuple(tensor.view.shape if isinstance(tensor, MappedTensor) else tensor.shape)
    if math.prod(stored) != math.prod(shape):
        raise ValueError(f"layout.reshape: {name} {stored} cannot take the shape {shape}")
    if isinstance(tensor, MappedTensor):
        return MappedTensor(tensor.view.reshape(shape), tensor.dtype)
    return tensor.reshape(shape)


def _zeros_like(tensor: Stored) -> Stored:
    """A tensor of zeros shaped and typed as `tensor` (lazy array or mapped view alike)."""
    if isinstance(tensor, MappedTensor):
        return MappedTensor(np.zeros_like(tensor.view), tensor.dtype)
    return mx.zeros_like(tensor)


def read_tensors(folder: Path, config: SpeechConfig) -> dict[str, mx.array]:
    """The folder's tensors under the bundled model's names, as lazy arrays: each is read when evaluated."""
    tensors: dict[str, mx.array] = {}
    for file in tensor_files(folder, config):
        tensors.update(mx.load(str(file), format="safetensors"))
    return _under_model_names(config, tensors)


def mapped_tensors(folder: Path, config: SpeechConfig) -> dict[str, MappedTensor]:
    """The folder's tensors under the bundled model's names, as views of the mapped files."""
    tensors: dict[str, MappedTensor] = {}
    for file in tensor_files(folder, config):
        tensors.update(map_safetensors(file))
    return _under_model_names(config, tensors)


def parameter_shapes(config: SpeechConfig, quantized: Collection[str] = ()) -> dict[str, tuple[int, ...]]:
    """Every parameter the model built from `config` has, with its shape (MLX allocates lazily: no cost).

    With a quantized config, the modules named in `quantized` take their quantized form first, so the
    shapes are those of the stored weight, scales and biases.
    """
    model = model_class(config.model_type)(config)
    if config.quantization is not None:
        quantize_modules(model, config.quantization, {f"{path}.scales" for path in quantized})
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def _load_speech_llm(folder: Path) -> SpeechLLM:
    """A speech-LLM folder: our audio half from its safetensors, the LLM through mlx_lm.load()."""
    config = SpeechLLMConfig.from_file(folder_file(folder, CONFIG_FILE))
    folder_dir(folder, config.llm_folder, f"{CONFIG_FILE} llm_folder")  # mlx_lm.load reads what it names
    weights: dict[str, mx.array] = {}
    for file in weight_files(folder):
        weights.update(mx.load(str(file), format="safetensors"))
    return load_speech_llm(folder, config, weights)


# config.json's model_type -> the loader of a folder that is not a SpeechModel's (MODEL_TYPES has those).
LOADERS: dict[str, Callable[[Path], Any]] = {"canary-qwen": _load_speech_llm}


def load_model(path: str | Path) -> Any:
    """Build the model from `config.json` and load its weights with strict checking, in inference mode:
    the folder's `model_type` chooses the model (LOADERS, else MODEL_TYPES' SpeechModel class)."""
    folder = Path(path)
    try:
        config = read_json(folder_file(folder, CONFIG_FILE))
        model_type = config.get("model_type") if isinstance(config, dict) else None
        model = LOADERS[model_type](folder) if isinstance(model_type, str) and model_type in LOADERS \
            else _load_speech_model(folder)
    except ModelFolderError as exc:  # names the file at fault already, after the folder
        raise ModelFolderError(f"{folder}: not a loadable canary-convert MLX folder: "
                               f"{str(exc).removeprefix(f'{folder}: ')}") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise ModelFolderError(f"{folder}: not a loadable canary-convert MLX folder: {exc}") from None
    warn_if_slow()
    return model


def _load_speech_model(folder: Path) -> Any:
    """A folder of one of MODEL_TYPES' SpeechModel classes (a Canary model, a CTC model, ...)."""
    config = read_config(folder_file(folder, CONFIG_FILE))
    model = model_class(config.model_type)(config, load_tokenizer(folder, config.tokenizer))
    weights = read_tensors(folder, config)
    if config.quantization is not None:
        quantize_modules(model, config.quantization, weights.keys())
    model.load_weights(list(weights.items()), strict=True)
    widen_products(model)
    model.attach(folder)
    model.eval()
    return model
