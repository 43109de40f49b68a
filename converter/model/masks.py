"""The one padding mask every stage shares."""

from __future__ import annotations

import mlx.core as mx


def valid_mask(lengths: mx.array, size: int) -> mx.array:
    """(B, size) boolean, True where the index is below the utterance's length."""
    return mx.arange(size)[None, :] < lengths[:, None]
