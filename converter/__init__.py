"""canary-convert: NeMo speech checkpoints (Canary, canary-qwen, Parakeet CTC and transducers) to Apple MLX,
proven against NeMo."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

from .blas import BlasInfo, preload

__version__ = "0.1.0"

# Before anything imports MLX: on Linux its CPU backend binds its BLAS when mlx.core is first loaded.
BLAS: BlasInfo = preload()

if TYPE_CHECKING:
    from .model.speech import SpeechModel


def load_model(path_or_repo: str | PathLike[str], revision: str | None = None) -> SpeechModel:
    """Load a converted MLX folder into the bundled model of its family (MLX only; torch is never imported).

    `path_or_repo` is a local folder, else a Hub repo id (`mlx-community/...`, at `revision` when given),
    fetched through huggingface_hub's cache and checked against the manifest in its `conversion.json`.
    """
    from .model.load import load_model as _load
    from .source import resolve_folder

    return _load(resolve_folder(path_or_repo, revision))


__all__ = ["BLAS", "__version__", "load_model"]
