"""Clips into a batch as NeMo's transcribe dataloader makes one: short clips centred in a second of silence
(lhotse's cut.pad(duration=1.0, direction="both")), then right-padded with zeros to the longest."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_MIN_SECONDS = 1.0


def pad_short(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Centre a clip shorter than a second in silence, as NeMo's transcribe dataloader does."""
    missing = int(PAD_MIN_SECONDS * sample_rate) - samples.size
    if missing <= 0:
        return samples
    left = missing // 2
    return np.pad(samples, (left, missing - left))


def pad_batch(signals: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad clips with zeros into one (B, T) float32 batch, with their sample counts."""
    lengths = np.array([signal.size for signal in signals], dtype=np.int64)
    batch = np.zeros((len(signals), int(lengths.max())), dtype=np.float32)
    for row, signal in enumerate(signals):
        batch[row, : signal.size] = signal
    return batch, lengths
