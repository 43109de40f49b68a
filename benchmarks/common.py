"""What the MLX and NeMo probes share, so both sides time the same work."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

SAMPLE_RATE = 16000
AUDIO_SECONDS = 30
LANGUAGE = "en"  # the factory's checkpoints speak en and de
# EOS's output bias on both sides: a random decoder then never stops early, so every run makes
# the same number of steps.
SUPPRESSED_BIAS = -1e4


def test_audio(seconds: int = AUDIO_SECONDS) -> np.ndarray:
    """Seeded noise at speech level, 30 s unless told (the encoder's cost does not depend on the content)."""
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(SAMPLE_RATE * seconds)).astype(np.float32)


def best_of(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls of `run` (after the caller's warm-up): the least disturbed one."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def probe_arguments(source: str) -> argparse.Namespace:
    """A probe's command line: what it loads (`source`), decoding steps, timed runs."""
    parser = argparse.ArgumentParser()
    parser.add_argument(source)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()
