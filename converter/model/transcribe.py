"""Audio in, text out: NeMo's `transcribe()` on the bundled MLX model (audio -> prompt -> decoding -> text)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import mlx.core as mx
import numpy as np

from ..errors import AudioError, UsageError
from .audio_io import load_audio
from .decoding import DecodingOptions, decode
from .prompts import PromptOptions, build_prompt
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .canary import CanaryModel

AudioItem = Union[str, Path, np.ndarray]
AudioInput = Union[AudioItem, Sequence[AudioItem]]

# NeMo's transcribe() batches 4 clips at a time and pads clips shorter than 1 s with silence on both sides
# (lhotse's cut.pad(duration=1.0, direction="both")). The batch matters for tokens: NeMo's length budget
# is taken from the batch's padded encoder length.
DEFAULT_BATCH_SIZE = 4
PAD_MIN_SECONDS = 1.0


@dataclass(frozen=True)
class Transcript:
    """One clip's result: the text and the generated token ids (prompt and final EOS excluded)."""

    source: str
    text: str
    tokens: list[int]


def _load(item: AudioItem, index: int, sample_rate: int) -> tuple[str, np.ndarray]:
    if isinstance(item, np.ndarray):
        if item.ndim != 1:
            raise AudioError(f"audio array {index}: expected one channel (T,) at {sample_rate} Hz, got {item.shape}")
        return f"<array {index}>", item.astype(np.float32, copy=False)
    return str(item), load_audio(item, sample_rate)


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


def transcribe(
    model: CanaryModel,
    tokenizer: Tokenizer,
    audio: AudioInput,
    prompt: PromptOptions,
    decoding: DecodingOptions,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Transcript]:
    """Transcribe (or translate) clips in batches of `batch_size`, in order."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    items = [audio] if isinstance(audio, (str, Path, np.ndarray)) else list(audio)
    sample_rate = model.config.preprocessor.sample_rate
    prompt_ids = build_prompt(model.config.prompt_format, tokenizer, prompt)
    results: list[Transcript] = []
    for start in range(0, len(items), batch_size):
        loaded = [_load(item, start + i, sample_rate) for i, item in enumerate(items[start : start + batch_size])]
        clips = [pad_short(samples, sample_rate) for _, samples in loaded]
        batch, lengths = pad_batch(clips)
        features, frames = model.preprocess(mx.array(batch), mx.array(lengths))
        encoded, enc_lengths = model.encode(features, frames)
        tokens = decode(model, encoded, enc_lengths, [prompt_ids] * len(clips), decoding,
                        tokenizer.eos_id, tokenizer.pad_id)
        results.extend(
            Transcript(source=name, text=tokenizer.decode(ids), tokens=ids) for (name, _), ids in zip(loaded, tokens)
        )
    return results


def decoding_options(model: CanaryModel, strategy: str | None, beam_size: int | None,
                     length_penalty: float | None) -> DecodingOptions:
    """The checkpoint's decoding defaults, with whatever the caller overrides (a bad value is a usage error)."""
    overrides = {name: value for name, value in
                 (("strategy", strategy), ("beam_size", beam_size), ("length_penalty", length_penalty))
                 if value is not None}
    try:
        return replace(DecodingOptions.from_config(model.config.decoding), **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
