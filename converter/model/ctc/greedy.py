"""NeMo's CTC `greedy_batch` decoding (ctc_greedy_decoding.py, ctc_decoding.py), vectorised over the batch.

Per frame the most likely class (argmax; ties to the lower index, as torch.argmax on CPU); then NeMo's
collapse: a label is emitted where it is not the blank and differs from the previous frame's label (a
blank between two equal labels lets the second one through). Each emitted token keeps the frame that
emitted it, which is NeMo's per-token `end_offset` in `timestamp['char']`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..speech import Decoded


def frame_labels(logprobs: mx.array) -> np.ndarray:
    """(B, T, V+1) log-probabilities -> (B, T) most likely class per frame."""
    return np.array(mx.argmax(logprobs, axis=-1)).astype(np.int64)


def collapse(labels: np.ndarray, lengths: np.ndarray, blank_id: int) -> list[Decoded]:
    """Frame labels (B, T) and valid frame counts (B,) -> the merged, blank-free tokens of each row with the
    frame that emits each."""
    previous = np.concatenate([np.full((labels.shape[0], 1), blank_id), labels[:, :-1]], axis=1)
    valid = np.arange(labels.shape[1])[None, :] < lengths[:, None]
    emitted = valid & (labels != blank_id) & (labels != previous)
    results = []
    for row in range(labels.shape[0]):
        frames = np.flatnonzero(emitted[row])
        results.append(Decoded(labels[row, frames].tolist(), True, frames.tolist()))
    return results


def greedy_batch(logprobs: mx.array, lengths: mx.array, blank_id: int) -> list[Decoded]:
    """NeMo's greedy_batch for a padded batch of CTC log-probabilities."""
    return collapse(frame_labels(logprobs), np.array(lengths).astype(np.int64), blank_id)
