"""Read audio as mono float32 at the model's rate: libsndfile for WAV/FLAC/OGG, ffmpeg for anything else.

A recording is opened as an `AudioSource` that hands out any range of samples, so long files are read a
block at a time and memory does not grow with their length. Files at another rate (resampled with soxr's
high quality, librosa's default) and formats libsndfile cannot read (decoded by ffmpeg) are first written,
block by block, to a temporary 32-bit float WAV at the model's rate, which is removed on close.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import soundfile
import soxr

from ...errors import AudioError

# Samples converted per step when a file must be resampled first (about 10 MB of float32 at 44.1 kHz).
CONVERT_BLOCK = 1 << 20


class AudioSource:
    """One recording as mono float32 at `sample_rate`: `read(start, stop)` returns that range, clipped."""

    def __init__(self, name: str, num_samples: int, sample_rate: int, read: Callable[[int, int], np.ndarray]):
        self.name = name
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self._read = read

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(start, 0), min(stop, self.num_samples)
        if stop <= start:
            return np.zeros(0, dtype=np.float32)
        return self._read(start, stop)


def _mono(block: np.ndarray) -> np.ndarray:
    return block.mean(axis=1, dtype=np.float32)


def _file_source(name: str, handle: soundfile.SoundFile) -> AudioSource:
    def read(start: int, stop: int) -> np.ndarray:
        handle.seek(start)
        return _mono(handle.read(stop - start, dtype="float32", always_2d=True))

    return AudioSource(name, handle.frames, handle.samplerate, read)


def _resample_to(handle: soundfile.SoundFile, target: Path, sample_rate: int) -> None:
    """Average the channels and resample block by block (soxr's stream gives the one-shot result exactly)."""
    stream = soxr.ResampleStream(handle.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
    with soundfile.SoundFile(target, "w", sample_rate, 1, subtype="FLOAT") as out:
        while True:
            block = handle.read(CONVERT_BLOCK, dtype="float32", always_2d=True)
            last = handle.tell() >= handle.frames
            out.write(stream.resample_chunk(_mono(block), last=last))
            if last:
                return


def _ffmpeg_to(path: Path, target: Path, sample_rate: int) -> None:
    """Formats libsndfile cannot read (mp3, m4a, ...) go through ffmpeg when it is installed."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: not a WAV/FLAC/OGG file libsndfile can read; install ffmpeg to read other formats"
        )
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(sample_rate),
               "-c:a", "pcm_f32le", "-y", str(target)]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        raise AudioError(f"{path}: ffmpeg cannot decode it: {done.stderr.decode(errors='replace').strip()}")


@contextmanager
def open_audio(item: str | Path | np.ndarray, sample_rate: int = 16000, name: str | None = None) -> Iterator[AudioSource]:
    """A path (any format, any rate) or a 1-D array already at `sample_rate`, as an AudioSource."""
    if isinstance(item, np.ndarray):
        if item.ndim != 1:
            raise AudioError(f"{name or 'audio array'}: expected one channel (T,) at {sample_rate} Hz, got {item.shape}")
        samples = item.astype(np.float32, copy=False)
        yield AudioSource(name or "<array>", samples.size, sample_rate, lambda start, stop: samples[start:stop])
        return
    path = Path(item)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    with ExitStack() as stack:
        try:
            handle = stack.enter_context(soundfile.SoundFile(str(path)))
        except (soundfile.LibsndfileError, RuntimeError):
            handle = None
        if handle is None or handle.samplerate != sample_rate:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="canary-audio-")))
            converted = scratch / "audio.wav"
            if handle is None:
                _ffmpeg_to(path, converted, sample_rate)
            else:
                _resample_to(handle, converted, sample_rate)
            handle = stack.enter_context(soundfile.SoundFile(str(converted)))
        yield _file_source(name or str(path), handle)


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """A whole file as mono float32 at `sample_rate`."""
    with open_audio(path, sample_rate) as source:
        return source.read(0, source.num_samples)
