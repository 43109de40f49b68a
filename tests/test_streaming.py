"""The goldens' passes with layers streamed (weights copied in from the mapped folder for each call) give
the same numbers and tokens as the loaded model, and leave no layer's weights behind."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from canary_convert import load_model
from canary_convert.errors import ModelFolderError
from canary_convert.goldens import decode_goldens, run_group
from canary_convert.model.load import mapped_tensors, read_tensors
from canary_convert.model.cpu.mapped import map_safetensors
from canary_convert.model.cpu.streaming import layers_streamed
from canary_convert.parity import reference_signals
from conftest import run_cli


def _layer_bytes(model) -> int:  # noqa: ANN001
    layers = [*model.encoder.layers, *model.decoder.blocks]
    return sum(array.nbytes for layer in layers for _, array in tree_flatten(layer.parameters()))


@pytest.mark.parametrize("options", [[], ["--quantize", "8"], ["--dtype", "float16"], ["--dtype", "bfloat16"]])
def test_streamed_passes_are_exact_and_free_the_layer_weights(
    quantizable_checkpoints: dict[str, Path], tmp_path: Path, options: list[str]
) -> None:
    folder = tmp_path / "mlx"
    result = run_cli(str(next(iter(quantizable_checkpoints.values()))), str(folder), *options)
    assert result.returncode == 0, result.stderr
    signals = reference_signals(16000)

    model = load_model(folder)
    plain_run = run_group(model, signals)
    plain, plain_decoded = plain_run.stages, decode_goldens(model, plain_run)
    del plain_run
    held_plain = mx.get_active_memory()
    del model

    model = load_model(folder)
    with layers_streamed(model, folder):
        assert type(model.decoder.blocks[0]).__name__ == "_OneAtATime"
        streamed_run = run_group(model, signals)
        streamed, streamed_decoded = streamed_run.stages, decode_goldens(model, streamed_run)
        del streamed_run
    held_streamed = mx.get_active_memory()

    for stage in ("features", "frames", "encoded", "enc_lengths", "logprobs"):
        assert np.array_equal(getattr(plain, stage), getattr(streamed, stage)), stage
    assert streamed_decoded == plain_decoded  # every prompt and mode: the same tokens and near-tie gaps
    assert type(model.encoder.layers[0]).__name__ == "ConformerLayer"  # the layers are back in place
    assert type(model.decoder.blocks[0]).__name__ == "DecoderBlock"
    # The plain passes keep every layer weight they read; the streamed ones gave them back unread.
    assert held_plain - held_streamed >= 0.9 * _layer_bytes(model)
    # Afterwards the model still works, reading its weights again.
    again = run_group(model, signals).stages
    assert np.array_equal(again.logprobs, plain.logprobs)


def test_mapped_tensors_equal_mx_load(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mlx"
    assert run_cli(str(next(iter(quantizable_checkpoints.values()))), str(folder), "--quantize", "4").returncode == 0
    config = load_model(folder).config
    loaded, mapped = read_tensors(folder, config), mapped_tensors(folder, config)
    assert set(mapped) == set(loaded)
    assert {str(array.dtype) for array in loaded.values()} >= {"mlx.core.uint32", "mlx.core.float32"}
    for name, array in loaded.items():
        copy = mapped[name].load()
        assert copy.dtype == array.dtype and copy.shape == array.shape, name
        assert mx.array_equal(copy, array).item(), name


def test_a_tensor_past_the_end_of_the_file_is_named(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mlx"
    assert run_cli(str(next(iter(quantizable_checkpoints.values()))), str(folder)).returncode == 0
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 4)
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: not a readable safetensors file: .* does not fit the file's"):
        map_safetensors(weights)
