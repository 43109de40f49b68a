"""Read audio files as 16 kHz mono float32: libsndfile for WAV/FLAC/OGG, ffmpeg for anything else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile
import soxr

from ..errors import AudioError


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode, average the channels and resample (soxr's high quality, librosa's default) to `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError):
        return _ffmpeg(path, sample_rate)
    mono = samples.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return mono


def _ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    """Formats libsndfile cannot read (mp3, m4a, ...) go through ffmpeg when it is installed."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: not a WAV/FLAC/OGG file libsndfile can read; install ffmpeg to read other formats"
        )
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        raise AudioError(f"{path}: ffmpeg cannot decode it: {done.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(done.stdout, dtype=np.float32).copy()
