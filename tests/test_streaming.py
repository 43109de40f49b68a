"""The goldens' encoder pass, streamed one layer's weights at a time, gives the same numbers and leaves the
encoder's weights unread."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from canary_convert import load_model
from canary_convert.goldens import run_group
from canary_convert.parity import reference_signals
from conftest import run_cli


@pytest.mark.parametrize("options", [[], ["--quantize", "8"]])
def test_streamed_encoder_pass_is_exact_and_frees_the_encoder_weights(
    quantizable_checkpoints: dict[str, Path], tmp_path: Path, options: list[str]
) -> None:
    folder = tmp_path / "mlx"
    result = run_cli(str(next(iter(quantizable_checkpoints.values()))), str(folder), *options)
    assert result.returncode == 0, result.stderr
    signals = reference_signals(16000)

    model = load_model(folder)
    plain = run_group(model, signals).stages  # numpy; the run's MLX arrays are let go
    held_plain = mx.get_active_memory()
    del model

    model = load_model(folder)
    streamed = run_group(model, signals, folder).stages
    held_streamed = mx.get_active_memory()

    for stage in ("features", "frames", "encoded", "enc_lengths", "logprobs"):
        assert np.array_equal(getattr(plain, stage), getattr(streamed, stage)), stage
    assert type(model.encoder.layers[0]).__name__ == "ConformerLayer"  # the layers are back in place
    encoder_layers = sum(array.nbytes for layer in model.encoder.layers for _, array in tree_flatten(layer.parameters()))
    # The plain pass keeps every encoder weight it read; the streamed one gave them back unread.
    assert held_plain - held_streamed >= 0.9 * encoder_layers
