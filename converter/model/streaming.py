"""Encoder layers run one at a time, each holding its weights in memory only for its own turn.

The golden outputs run a converted model once, at conversion time; holding every encoder weight for that
one pass would put most of the model in memory (2.5 GB for canary-1b in float16). Weights loaded with
`mx.load` are lazy: read from the file when first evaluated, then kept while referenced. So each layer is
evaluated as soon as it has run and then given fresh, unread arrays for its weights, which frees the
ones it read. The decoder, which every search step needs whole, stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .canary import CanaryModel
from .load import read_tensors


class _OneAtATime(nn.Module):
    """`layer`, evaluated as soon as it runs, then handed unread weights from `unread()`."""

    def __init__(self, layer: nn.Module, unread: Callable[[], dict[str, Any]]):
        super().__init__()
        self.layer = layer
        self._unread = unread

    def __call__(self, *args: Any) -> mx.array:
        out = self.layer(*args)
        mx.eval(out)
        self.layer.update(self._unread())
        return out


@contextmanager
def encoder_layers_streamed(model: CanaryModel, folder: Path) -> Iterator[None]:
    """While open, the model's encoder layers read their weights from `folder` each time they run."""
    layers = model.encoder.layers

    def unread(index: int) -> Callable[[], dict[str, Any]]:
        prefix = f"encoder.layers.{index}."
        return lambda: tree_unflatten([(name.removeprefix(prefix), array)
                                       for name, array in read_tensors(folder, model.config).items()
                                       if name.startswith(prefix)])

    model.encoder.layers = [_OneAtATime(layer, unread(index)) for index, layer in enumerate(layers)]
    try:
        yield
    finally:
        model.encoder.layers = layers
