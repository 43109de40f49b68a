"""canary-convert: NeMo Canary checkpoints (.nemo) to Apple MLX, proven against NeMo."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .blas import BlasInfo, preload

__version__ = "0.1.0"

# Before anything imports MLX: on Linux its CPU backend binds its BLAS when mlx.core is first loaded.
BLAS: BlasInfo = preload()

if TYPE_CHECKING:
    from .model.aed.canary import CanaryModel


def load_model(path: Any) -> CanaryModel:
    """Load a converted MLX folder into the bundled model (MLX only; torch is never imported)."""
    from .model.load import load_model as _load

    return _load(path)


__all__ = ["BLAS", "__version__", "load_model"]
