"""A long recording made of the example's committed clips, for long-form transcription (built, not committed).

Clips of one language are drawn in a seeded random order and joined with pauses of 0.4 to 1.2 s of
low noise (about the level of the clips' own background), until the file is at least `seconds` long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 16000
NOISE_RMS = 0.0015  # the clips' own background level


@dataclass(frozen=True)
class LongAudio:
    """The samples, and for each utterance in order: its reference record and where it sits (seconds)."""

    samples: np.ndarray
    records: list[dict]
    spans: list[tuple[float, float]]

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


def build_long_audio(example: Path, lang: str, seconds: float = 180.0, seed: int = 2026) -> LongAudio:
    records = [r for r in json.loads((example / "references.json").read_text()) if r["lang"] == lang]
    clips = [soundfile.read(example / r["audio"], dtype="float32")[0] for r in records]
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    chosen: list[dict] = []
    spans: list[tuple[float, float]] = []
    position = 0
    while position < seconds * SAMPLE_RATE:
        index = int(rng.integers(len(clips)))
        pause = (NOISE_RMS * rng.standard_normal(int(rng.uniform(0.4, 1.2) * SAMPLE_RATE))).astype(np.float32)
        chosen.append(records[index])
        spans.append((position / SAMPLE_RATE, (position + clips[index].size) / SAMPLE_RATE))
        parts += [clips[index], pause]
        position += clips[index].size + pause.size
    return LongAudio(np.concatenate(parts), chosen, spans)

