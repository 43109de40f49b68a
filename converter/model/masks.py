"""The padding masks every stage shares."""

from __future__ import annotations

import mlx.core as mx


def valid_mask(lengths: mx.array, size: int) -> mx.array:
    """(B, size) boolean, True where the index is below the utterance's length."""
    return mx.arange(size)[None, :] < lengths[:, None]


# NeMo's masked score: the encoder's INF_VAL (multi_head_attention.py) and the decoder's NEG_INF
# (transformer_utils.py) are both -10000, not -inf.
MASK_VALUE = -10000.0


def additive_mask(visible: mx.array, dtype: mx.Dtype) -> mx.array:
    """Boolean "may attend" -> the additive form: 0 where allowed, -10000 where not."""
    return mx.where(visible, mx.array(0.0, dtype=dtype), mx.array(MASK_VALUE, dtype=dtype))
