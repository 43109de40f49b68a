"""Encoder layers and decoder blocks run one at a time, each holding its weights only for its own turn.

The golden outputs run a converted model at conversion time (and again in `verify`); holding its weights
for that would put the whole model in anonymous memory (canary-1b: 4 GB in float32, and the decoder alone,
which every search step runs, 1.6 GB). Instead, while `layers_streamed` is open, each layer copies its
weights in from the folder's memory-mapped files (`mapped.py`, at memory speed) when it is called,
evaluates its output, and is then handed lazy arrays that have never been read (`mx.load`'s: read only when
evaluated, which they never are here), so the copies are freed. The rest (embeddings, the pre-encode
convolutions, the final norms and the head) stays loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..speech import SpeechModel
from ..load import mapped_tensors, read_tensors
from .activations import slow_cpu
from .mapped import MappedTensor, Widener
from .widened import WidenedLinear


def _relative(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The tensors named `prefix...`, by their names inside the module at `prefix`."""
    return {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}


@dataclass(frozen=True)
class _LayerWeights:
    """Where one layer's weights come from (mapped views, relative names), which of them come widened to
    float32 and through what, and what the layer holds between calls (a parameter tree of unread lazy
    arrays). Not a dict, so the wrapper does not take it for parameters."""

    mapped: dict[str, MappedTensor]
    unread: dict[str, Any]
    widen: frozenset[str]  # half-precision product weights, copied in as float32 (see `_widened_on_copy`)
    widener: Widener


class _OneAtATime(nn.Module):
    """`layer`, its weights copied in for each call and let go once the call's output is evaluated."""

    def __init__(self, layer: nn.Module, weights: _LayerWeights):
        super().__init__()
        self.layer = layer
        self._weights = weights

    def _run(self, method: Callable[..., Any], *args: Any) -> Any:
        weights = self._weights
        self.layer.update(tree_unflatten([(name, weights.widener(tensor) if name in weights.widen else tensor.load())
                                          for name, tensor in weights.mapped.items()]))
        try:
            out = method(*args)
            mx.eval(out)
        finally:
            self.layer.update(weights.unread)
        return out

    def __call__(self, *args: Any) -> Any:
        return self._run(self.layer, *args)

    def cross_kv(self, xa: mx.array) -> tuple[mx.array, mx.array]:
        """A decoder block's other entry point: its cross-attention keys and values."""
        return self._run(self.layer.cross_kv, xa)


def _widened_on_copy(layer: nn.Module) -> frozenset[str]:
    """The weights of the layer's half-precision products, which `widened.py` multiplies in float32 on
    this CPU: copied in as float32 once (exact), instead of widened by MLX, one element at a time, at
    every product."""
    if not slow_cpu():
        return frozenset()
    return frozenset(f"{name}.weight".removeprefix(".") for name, module in layer.named_modules()
                     if isinstance(module, WidenedLinear))


@contextmanager
def layers_streamed(model: SpeechModel, folder: Path | None) -> Iterator[None]:
    """While open, the model's layer stacks (`SpeechModel.layer_stacks`: encoder layers, decoder blocks) copy their weights in from `folder` each
    time they run; afterwards they hold unread lazy arrays of `folder`, read again when next used. Without
    a folder, the layers keep the weights they were loaded with."""
    if folder is None:
        yield
        return
    mapped = mapped_tensors(folder, model.config)
    unread = read_tensors(folder, model.config)
    widener = Widener()
    owners = {path: model[path.rsplit(".", 1)[0]] for path in model.layer_stacks}
    stacks = {path: getattr(owner, path.rsplit(".", 1)[1]) for path, owner in owners.items()}

    def streamed(path: str, layers: list[nn.Module]) -> list[nn.Module]:
        wrapped = []
        for index, layer in enumerate(layers):
            prefix = f"{path}.{index}."
            layer_unread = tree_unflatten(list(_relative(prefix, unread).items()))
            layer.update(layer_unread)  # weights already read are let go now
            weights = _LayerWeights(_relative(prefix, mapped), layer_unread, _widened_on_copy(layer), widener)
            wrapped.append(_OneAtATime(layer, weights))
        return wrapped

    try:
        for path, owner in owners.items():
            setattr(owner, path.rsplit(".", 1)[1], streamed(path, stacks[path]))
        yield
    finally:
        for path, owner in owners.items():
            setattr(owner, path.rsplit(".", 1)[1], stacks[path])
