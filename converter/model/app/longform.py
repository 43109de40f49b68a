"""Long recordings: cut into chunks, encoded and decoded a batch at a time, joined into one transcript.

Which rule cuts the file is chunking.py's business (NeMo's fixed chunks, NeMo's overlapping chunks, or our
cut at pauses); this module reads only the samples a batch needs from the `AudioSource`, so memory stays
flat however long the file is, and reports each finished chunk to an optional progress callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from ...errors import UsageError
from .audio_io import AudioSource
from .clips import pad_short
from .chunking import (
    FRAME_CHUNK_SECONDS,
    FRAME_CHUNK_SECONDS_TIMESTAMPS,
    PARALLEL_MAX_SECONDS,
    PARALLEL_MIN_SECONDS,
    PARALLEL_OVERLAP_SECONDS,
    PauseRule,
    Span,
    frame_chunks,
    frame_levels,
    parallel_chunk_size,
    parallel_chunks,
    parallel_windows,
    pause_chunks,
    speech_runs,
    speech_seconds,
)
from .merge import merge_chunk_tokens
from ..speech import AudioBatch, BatchDecoder, Decoded

if TYPE_CHECKING:
    from ..speech import SpeechModel

Progress = Callable[[int, int], None]  # (chunks done, chunks in the file)

CHUNKING = ("nemo", "pauses", "off")
# NVIDIA trains Canary on clips of up to 40 s and both of NeMo's long-form rules cut at 40 s.
WINDOW_SECONDS = 40.0
# FrameBatchMultiTaskAED normalises each chunk with numpy's (population) std plus this.
NORMALIZE_EPS = 1e-5
# Samples per read when measuring levels for the pause rule.
LEVEL_BLOCK_SECONDS = 30


@dataclass(frozen=True)
class LongFormOptions:
    """How recordings longer than a window are handled.

    `chunking`: "nemo" (NeMo 3.0's rule for this checkpoint: overlapping chunks when it carries its
    timestamps model, fixed chunks otherwise), "pauses" (ours: whole utterances packed up to the window),
    or "off" (one piece, as NeMo's plain transcribe(); longer inputs are flagged). `chunk_seconds`: the
    window; None means NeMo's (40 s, or 10 s for fixed chunks with timestamps).
    """

    chunking: str = "nemo"
    chunk_seconds: float | None = None
    pause_rule: PauseRule = field(default_factory=PauseRule)

    def __post_init__(self) -> None:
        if self.chunking not in CHUNKING:
            raise UsageError(f"chunking {self.chunking!r}: choose one of {', '.join(CHUNKING)}")
        if self.chunk_seconds is not None and not self.chunk_seconds > 0:
            raise UsageError(f"chunk_seconds must be positive, got {self.chunk_seconds}")


def method_for(model: SpeechModel, options: LongFormOptions) -> str:
    """"frames", "parallel" or "pauses": the rule long inputs go through (or "off")."""
    if options.chunking == "nemo":
        return model.nemo_long_form
    return options.chunking


def window_seconds(method: str, options: LongFormOptions, timestamps: bool) -> float:
    """The longest stretch decoded in one piece; longer inputs are chunked (or flagged when chunking is off)."""
    if options.chunk_seconds is not None:
        return options.chunk_seconds
    if method == "frames":
        return FRAME_CHUNK_SECONDS_TIMESTAMPS if timestamps else FRAME_CHUNK_SECONDS
    if method == "parallel":
        return float(PARALLEL_MAX_SECONDS)
    return WINDOW_SECONDS


def is_long(method: str, num_samples: int, sample_rate: int, window: float) -> bool:
    """Whether an input goes through long-form inference rather than in one piece."""
    if method == "parallel":
        # NeMo's _find_optimal_chunk_size keeps a file whole only when it is shorter than the 40 s maximum.
        return num_samples >= window * sample_rate
    return method != "off" and num_samples > window * sample_rate


@dataclass(frozen=True)
class ChunkOutput:
    """One decoded chunk: where it lies in the file (seconds) and what the decoder made of it."""

    start: float
    end: float
    decoded: Decoded


@dataclass(frozen=True)
class LongFormOutput:
    """Every chunk in order; `groups` lists the chunks that NeMo merges together (its one-hour windows),
    `frame_offsets` the encoder-frame offset of each chunk (fixed chunks: NeMo's timestamp shift), and
    `speech` the seconds of speech in each chunk by the pause rule's detector (what its transcript is
    weighed against, transcribe.py's sparse chunks)."""

    method: str
    chunks: list[ChunkOutput]
    groups: list[list[int]]
    frame_offsets: list[int] | None = None
    speech: list[float] = field(default_factory=list)


def _batches(items: Sequence[Span], size: int) -> Iterator[list[Span]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def frame_features(model: SpeechModel, source: AudioSource, span: Span) -> np.ndarray:
    """Normalised features of frames [start, stop) of the whole file's log-mel, from just the samples
    those frames see (each frame's window and the sample before it, for pre-emphasis)."""
    pre = model.preprocessor
    half = pre.n_fft // 2
    # Start the block a whole number of hops early, so the block's frames line up with the file's.
    context = pre.hop_length * math.ceil((half + 1) / pre.hop_length)
    first = max(span.start * pre.hop_length - context, 0)
    block = source.read(first, (span.stop - 1) * pre.hop_length + half)
    mel, _ = pre.log_mel(mx.array(block[None, :]), mx.array([block.size]))
    offset = span.start - first // pre.hop_length
    features = np.array(mel[0, :, offset : offset + span.size])
    # FrameBatchMultiTaskAED: per feature, mean and population std over the chunk's own frames.
    mean, std = features.mean(axis=1, keepdims=True), features.std(axis=1, keepdims=True)
    return (features - mean) / (std + NORMALIZE_EPS)


def _frame_batch(model: SpeechModel, source: AudioSource, spans: list[Span]) -> AudioBatch:
    chunks = [frame_features(model, source, span) for span in spans]
    width = max(chunk.shape[1] for chunk in chunks)
    # NeMo's speech_collate_fn pads features with zeros.
    batch = np.zeros((len(chunks), chunks[0].shape[0], width), dtype=np.float32)
    for row, chunk in enumerate(chunks):
        batch[row, :, : chunk.shape[1]] = chunk
    return AudioBatch(mx.array(batch), mx.array([chunk.shape[1] for chunk in chunks]))


def _sample_batch(model: SpeechModel, source: AudioSource, spans: list[Span], width: int | None) -> AudioBatch:
    """Chunks of samples through the model's own preprocessor (each normalised over its valid frames),
    right-padded with zeros to `width` (NeMo pads every parallel chunk to the chunk size) or the longest."""
    clips = [pad_short(source.read(span.start, span.stop), source.sample_rate) for span in spans]
    width = max([width or 0] + [clip.size for clip in clips])
    batch = np.zeros((len(clips), width), dtype=np.float32)
    for row, clip in enumerate(clips):
        batch[row, : clip.size] = clip
    samples, counts = mx.array(batch), mx.array([clip.size for clip in clips])
    return AudioBatch(*model.preprocess(samples, counts), samples, counts)


def _run(model: SpeechModel, groups: list[list[Span]], make_batch: Callable[[int, list[Span]], AudioBatch],
         seconds_per_unit: float, decode_batch: BatchDecoder, batch_size: int,
         progress: Progress | None) -> tuple[list[ChunkOutput], list[list[int]]]:
    """Decode each group's chunks `batch_size` at a time (a batch never mixes groups, as in NeMo)."""
    outputs: list[ChunkOutput] = []
    indices: list[list[int]] = []
    total = sum(len(group) for group in groups)
    for number, group in enumerate(groups):
        indices.append([])
        for spans in _batches(group, batch_size):
            for span, decoded in zip(spans, decode_batch(make_batch(number, spans))):
                indices[-1].append(len(outputs))
                outputs.append(ChunkOutput(span.start * seconds_per_unit, span.stop * seconds_per_unit, decoded))
            if progress is not None:
                progress(len(outputs), total)
    return outputs, indices


def _frames(model: SpeechModel, source: AudioSource, window: float, **run: object) -> LongFormOutput:
    pre = model.config.preprocessor
    if pre.exact_pad:
        raise UsageError("fixed-chunk long-form inference does not handle exact_pad preprocessors; use chunking 'pauses'")
    frames = int(model.preprocessor.output_lengths(mx.array([source.num_samples])).item())
    spans = frame_chunks(frames, window, pre.window_stride)
    outputs, groups = _run(model, [spans], lambda _, batch: _frame_batch(model, source, batch),
                           model.preprocessor.hop_length / source.sample_rate, **run)
    return LongFormOutput("frames", outputs, groups, chunk_frame_offsets(spans, model.config.encoder.subsampling_factor))


def chunk_frame_offsets(spans: Sequence[Span], subsampling_factor: int) -> list[int]:
    """Encoder-frame shift of each fixed chunk's frame tokens: FrameBatchMultiTaskAED._join_timestamp adds
    the feature frames of all earlier chunks, integer-divided by the subsampling factor."""
    offsets, before = [], 0
    for span in spans:
        offsets.append(before // subsampling_factor)
        before += span.size
    return offsets


def _parallel(model: SpeechModel, source: AudioSource, window: float, **run: object) -> LongFormOutput:
    rate = source.sample_rate
    if window <= 2 * PARALLEL_OVERLAP_SECONDS:
        raise UsageError(f"overlapping chunks need a window over {2 * PARALLEL_OVERLAP_SECONDS:g} s, got {window:g}")
    groups, widths = [], []
    for hour in parallel_windows(source.num_samples, rate):
        # NeMo tries 30 to 40 s; a chosen window keeps the same proportion.
        size = parallel_chunk_size(hour.size, rate, int(window), int(window * PARALLEL_MIN_SECONDS / PARALLEL_MAX_SECONDS))
        groups.append([Span(hour.start + span.start, hour.start + span.stop)
                       for span in parallel_chunks(hour.size, size, rate)])
        widths.append(size)
    outputs, indices = _run(model, groups, lambda number, batch: _sample_batch(model, source, batch, widths[number]),
                            1 / rate, **run)
    return LongFormOutput("parallel", outputs, indices)


def _levels(source: AudioSource, frame: int) -> np.ndarray:
    block = LEVEL_BLOCK_SECONDS * source.sample_rate // frame * frame
    return np.concatenate([frame_levels(source.read(start, start + block), frame)
                           for start in range(0, max(source.num_samples, 1), block)])


def _pauses(model: SpeechModel, source: AudioSource, window: float, rule: PauseRule, levels: np.ndarray,
            **run: object) -> LongFormOutput:
    rate = source.sample_rate
    spans = pause_chunks(levels, rule, window, source.num_samples, rate)
    outputs, groups = _run(model, [spans], lambda _, batch: _sample_batch(model, source, batch, None), 1 / rate, **run)
    return LongFormOutput("pauses", outputs, groups)


def transcribe_chunks(model: SpeechModel, source: AudioSource, method: str, window: float, decode_batch: BatchDecoder,
                      batch_size: int, rule: PauseRule, progress: Progress | None = None) -> LongFormOutput:
    """Cut `source` by `method` and decode every chunk (in order) with the head's `decode_batch`, with each
    chunk's seconds of speech."""
    run = dict(decode_batch=decode_batch, batch_size=batch_size, progress=progress)
    levels = _levels(source, round(rule.frame_seconds * source.sample_rate))  # one read, in blocks
    if method == "frames":
        output = _frames(model, source, window, **run)
    elif method == "parallel":
        output = _parallel(model, source, window, **run)
    else:
        output = _pauses(model, source, window, rule, levels, **run)
    runs = speech_runs(levels, rule)
    return replace(output, speech=[speech_seconds(runs, chunk.start, chunk.end, rule.frame_seconds)
                                   for chunk in output.chunks])


def merged_tokens(output: LongFormOutput, subsampling_factor: int) -> list[tuple[list[int], list[int]]]:
    """Per group, the merged tokens and the chunk each comes from (end to end for fixed chunks and pauses)."""
    merged = []
    for group in output.groups:
        tokens = [output.chunks[index].decoded.tokens for index in group]
        if output.method == "parallel":
            joined, owners = merge_chunk_tokens(tokens, subsampling_factor)
            merged.append((joined, [group[owner] for owner in owners]))
        else:
            merged.append(([t for chunk in tokens for t in chunk],
                           [index for index, chunk in zip(group, tokens) for _ in chunk]))
    return merged
