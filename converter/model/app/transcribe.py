"""Audio in, text out: NeMo's `transcribe()` on the bundled MLX model (audio -> prompt -> decoding -> text).

Inputs up to the window are batched and decoded whole, exactly as NeMo's transcribe() does; longer ones go
through longform.py chunk by chunk. Nothing is cut silently: a transcript that the length budget ended,
an input decoded whole although longer than the window, and generated ids the tokenizer does not know
are flags on the `Transcript` and sentences in its `warnings` (which `CanaryModel.transcribe` also issues
as `TranscriptWarning`s; internal callers that record tokens, such as goldens, get the flags alone).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import mlx.core as mx
import numpy as np

from ...errors import TranscriptWarning, UsageError
from .audio_io import open_audio
from .clips import pad_batch, pad_short
from .longform import (
    LongFormOptions,
    LongFormOutput,
    is_long,
    merged_tokens,
    method_for,
    transcribe_chunks,
    window_seconds,
)
from ..aed.timestamps import frame_segments, split_timed_text, to_seconds
from ..speech import AudioBatch, BatchDecoder, Decoded, FrameWord, TimedText
from ..tokenizer import Tokenizer
from .chunking import PARALLEL_WINDOW_SECONDS
from .merge import merge_aligned_chunks

if TYPE_CHECKING:
    from ..ctc.align import TimestampAligner
    from ..speech import SpeechModel

AudioItem = Union[str, Path, np.ndarray]
AudioInput = Union[AudioItem, Sequence[AudioItem]]
FileProgress = Callable[[str, int, int], None]  # (audio name, chunks done, chunks in that file)

# NeMo's transcribe() batches 4 clips at a time (see clips.py for its padding). The batch matters for
# tokens: NeMo's length budget is taken from the batch's padded encoder length.
DEFAULT_BATCH_SIZE = 4


@dataclass(frozen=True)
class Chunk:
    """A stretch decoded in one piece: its place in the audio (seconds), the text it contributes to the
    transcript, the tokens the decoder generated for it, and whether it ended on end-of-text (False: the
    length budget cut it)."""

    start: float
    end: float
    text: str
    tokens: list[int]
    ended: bool


@dataclass(frozen=True)
class Transcript:
    """One input's result.

    `tokens` are the generated ids behind `text` (prompt and final EOS excluded; for overlapping chunks,
    after the overlaps are merged); `token_frames`, where the head places each token (a CTC model: the
    encoder frame that emits it; inputs decoded whole only). `words` and `segments` carry times when the
    model gives them (`timestamps`: frame tokens, or canary-1b-v2's aligner); `chunks` always do. `truncated`: some piece ended on the length budget, not end-of-text;
    `over_window`: decoded in one piece although longer than the window. `sparse_chunks`: the chunks whose
    transcript is far shorter than their speech (`SPARSE_TOKENS_PER_SECOND`). `warnings` says it in words.
    """

    source: str
    text: str
    tokens: list[int]
    seconds: float = 0.0
    chunks: tuple[Chunk, ...] = ()
    words: tuple[TimedText, ...] = ()
    segments: tuple[TimedText, ...] = ()
    timestamps: bool = False
    truncated: bool = False
    over_window: bool = False
    sparse_chunks: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()
    token_frames: tuple[int, ...] = ()


def audio_items(audio: AudioInput) -> list[AudioItem]:
    """One path or array, or a list of them, as a list."""
    return [audio] if isinstance(audio, (str, Path, np.ndarray)) else list(audio)


def item_name(item: AudioItem, index: int) -> str:
    return f"<array {index}>" if isinstance(item, np.ndarray) else str(item)


@dataclass(frozen=True)
class TextReader:
    """What turns a chunk's tokens into text: the model's text rule, and whether timed words are wanted."""

    model: SpeechModel
    tokenizer: Tokenizer
    timestamps: bool
    aligner: TimestampAligner | None = None  # a forced aligner, whose timed tokens overlapping chunks merge

    def text(self, tokens: Sequence[int], words: list[FrameWord] | None = None) -> tuple[str, list[FrameWord], list[int]]:
        """(text, timed words, ids outside the tokenizer) for generated tokens; `words`, when the head found
        them apart from the tokens (an aligner), are taken as they are, else read from frame tokens."""
        known = [token for token in tokens if token < self.tokenizer.vocab_size]
        unknown = [token for token in tokens if token >= self.tokenizer.vocab_size]
        text = self.model.decode_text(known)
        if not self.timestamps:
            return text, [], unknown
        if words is not None:
            return text, words, unknown
        words, text = split_timed_text(text)
        return text, words, unknown


# A chunk whose transcript has fewer text tokens than this per second of detected speech has lost words
# (a model that cannot read chunks this long). Normal speech is 2.5 or more: slow English at 2 words/s
# on canary-1b-v2's 16k BPE (~1.3 tokens a word), more with the smaller aggregate vocabularies; the example
# model's correct transcripts are 5.8 to 9.9; its 40 s chunks of the 3-minute demo file, 0.3 to 0.9.
SPARSE_TOKENS_PER_SECOND = 1.0
# Chunks with less speech than this are not judged (a word or two against a short noise is no evidence).
SPARSE_MIN_SPEECH_SECONDS = 4.0


def sparse_chunks(tokenizer: Tokenizer, output: LongFormOutput) -> tuple[int, ...]:
    """The chunks whose transcript is far shorter than their speech (see SPARSE_TOKENS_PER_SECOND)."""
    special = set(tokenizer.special_tokens.values())
    sparse = []
    for index, (piece, speech) in enumerate(zip(output.chunks, output.speech)):
        text_tokens = sum(1 for token in piece.decoded.tokens if token < tokenizer.vocab_size and token not in special)
        if speech >= SPARSE_MIN_SPEECH_SECONDS and text_tokens < SPARSE_TOKENS_PER_SECOND * speech:
            sparse.append(index)
    return tuple(sparse)


def _sparse_warning(name: str, chunks: Sequence[Chunk], sparse: Sequence[int], output: LongFormOutput) -> str:
    first = chunks[sparse[0]]
    advice = ("try a shorter --chunk-seconds" if output.method == "pauses"
              else "try --chunking pauses (chunking='pauses'), with --chunk-seconds")
    return (f"{name}: {len(sparse)} of {len(chunks)} chunks have far fewer words than speech (the first, "
            f"{first.start:.1f}-{first.end:.1f} s: {len(first.text.split())} words for "
            f"{output.speech[sparse[0]]:.1f} s of speech); the model may not read chunks this long: {advice} "
            "near the length of the clips it was trained on")


def _warnings(name: str, chunks: Sequence[Chunk], unknown: list[int], vocab_size: int,
              over_window: str | None, sparse: str | None = None) -> tuple[str, ...]:
    found = [sparse] if sparse else []
    if over_window:
        found.append(f"{name}: {over_window}")
    cut = [chunk for chunk in chunks if not chunk.ended]
    if cut:
        where = "" if len(chunks) == 1 else f" in {len(cut)} of {len(chunks)} chunks"
        found.append(f"{name}: decoding reached the length budget before end-of-text{where}; "
                     "the transcript is cut short")
    if unknown:
        listed = ", ".join(str(token) for token in sorted(set(unknown)))
        found.append(f"{name}: the model generated id(s) {listed} past the tokenizer's {vocab_size} entries "
                     "(padding rows of the decoder's vocabulary); kept in tokens, left out of the text")
    return tuple(found)


def _whole(reader: TextReader, name: str, seconds: float, decoded: Decoded, times: tuple[float, int],
           over_window: float | None) -> Transcript:
    """A clip decoded in one piece."""
    text, words, unknown = reader.text(decoded.tokens, decoded.words)
    chunk = Chunk(0.0, seconds, text.strip(), decoded.tokens, decoded.ended)
    return Transcript(
        source=name, text=text, tokens=decoded.tokens, seconds=seconds, token_frames=tuple(decoded.frames or ()),
        chunks=(chunk,),
        words=tuple(to_seconds(words, *times)), segments=tuple(to_seconds(frame_segments(words), *times)),
        timestamps=reader.timestamps, truncated=not decoded.ended, over_window=over_window is not None,
        warnings=_warnings(name, [chunk], unknown, reader.tokenizer.vocab_size,
                           None if over_window is None else reader.model.whole_input_risk(seconds, over_window)),
    )


def join_chunks(reader: TextReader, output: LongFormOutput, name: str, seconds: float,
                times: tuple[float, int]) -> Transcript:
    """Decoded chunks joined into one transcript: overlapping chunks merged as NeMo merges them, others end
    to end; frame tokens (with `timestamps`) read per chunk and shifted to the chunk's place.

    `times` is (window_stride, subsampling_factor), NeMo's factors from frame offsets to seconds.
    """
    stride, subsampling = times
    chunks: list[Chunk] = []
    words: list[TimedText] = []
    segments: list[TimedText] = []
    unknown: list[int] = []
    # Overlapping chunks' forced alignments are merged below, as NeMo merges them; other chunks' words are
    # each chunk's own.
    merge_aligned = output.method == "parallel" and reader.timestamps and reader.aligner is not None
    for index, piece in enumerate(output.chunks):
        text, frame_words, dropped = reader.text(piece.decoded.tokens, piece.decoded.words)
        unknown += dropped
        chunks.append(Chunk(piece.start, piece.end, text.strip(), piece.decoded.tokens, piece.decoded.ended))
        if merge_aligned:
            continue
        # Fixed chunks shift frame offsets by NeMo's integer frame offset; pause chunks by their start time.
        shift = (dict(frame_offset=output.frame_offsets[index]) if output.frame_offsets is not None
                 else dict(seconds_offset=piece.start))
        words += to_seconds(frame_words, stride, subsampling, **shift)
        segments += to_seconds(frame_segments(frame_words), stride, subsampling, **shift)
    tokens: list[int] = []
    texts: list[str] = []
    for group, (merged, owners) in zip(output.groups, merged_tokens(output, subsampling)):
        tokens += merged
        if merge_aligned:
            # With its aligner's times NeMo merges the aligner's tokens instead: they give text and words.
            assert reader.aligner is not None
            text, aligned = merge_aligned_chunks([output.chunks[index].decoded for index in group], subsampling,
                                                 reader.aligner)
            texts.append(text)
            words += to_seconds(aligned, stride, subsampling)
            segments += to_seconds(frame_segments(aligned), stride, subsampling)
        elif output.method == "parallel":
            texts.append(reader.text(merged)[0])
        else:
            texts += [chunks[index].text for index in sorted(set(owners))]
        if output.method == "parallel":
            # Each chunk's cue shows the tokens of the merged text it contributed.
            for index in sorted(set(owners)):
                own = [token for token, owner in zip(merged, owners) if owner == index]
                chunks[index] = replace(chunks[index], text=reader.text(own)[0].strip())
    # NeMo joins the texts of its hour windows (and we those of end-to-end chunks) stripped, by one space.
    text = " ".join(text.strip() for text in texts if text)
    sparse = sparse_chunks(reader.tokenizer, output)
    return Transcript(
        source=name, text=text, tokens=tokens, seconds=seconds, chunks=tuple(chunks), words=tuple(words),
        segments=tuple(segments), timestamps=reader.timestamps, truncated=any(not chunk.ended for chunk in chunks),
        sparse_chunks=sparse, warnings=_warnings(name, chunks, unknown, reader.tokenizer.vocab_size, None,
                                                 sparse and _sparse_warning(name, chunks, sparse, output)),
    )


def transcribe(
    model: SpeechModel,
    tokenizer: Tokenizer,
    audio: AudioInput,
    decode_batch: BatchDecoder,
    timestamps: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    long_form: LongFormOptions | None = None,
    progress: FileProgress | None = None,
    aligner: TimestampAligner | None = None,
) -> list[Transcript]:
    """Transcribe inputs in order with a head's `decode_batch` (speech.py): short ones in batches of
    `batch_size`, long ones chunked; `timestamps` reads timed words from what the head gives (with a forced
    `aligner`, whose timed tokens of overlapping chunks are merged as NeMo merges them)."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    long_form = long_form or LongFormOptions()
    reader = TextReader(model, tokenizer, timestamps, aligner)
    method = method_for(model, long_form)
    window = window_seconds(method, long_form, timestamps)
    times = (model.config.preprocessor.window_stride, model.config.encoder.subsampling_factor)
    sample_rate = model.config.preprocessor.sample_rate
    results: dict[int, Transcript] = {}
    pending: list[tuple[int, str, np.ndarray]] = []

    def flush() -> None:
        clips = [pad_short(samples, sample_rate) for _, _, samples in pending]
        batch, lengths = pad_batch(clips)
        samples, counts = mx.array(batch), mx.array(lengths)
        features, frames = model.preprocess(samples, counts)
        decoded = decode_batch(AudioBatch(features, frames, samples, counts))
        for (index, name, samples), result in zip(pending, decoded):
            seconds = samples.size / sample_rate
            over = window if seconds > window else None
            results[index] = _whole(reader, name, seconds, result, times, over)
        pending.clear()

    for index, item in enumerate(audio_items(audio)):
        with open_audio(item, sample_rate, item_name(item, index)) as source:
            if is_long(method, source.num_samples, sample_rate, window):
                if timestamps and method == "parallel" and source.seconds > PARALLEL_WINDOW_SECONDS:
                    # NeMo shifts the times of its later hour windows by rules of their own (merge_all_hypotheses),
                    # not reproduced here.
                    raise UsageError(f"{source.name}: {source.seconds:.1f} s is over an hour: timestamps of NeMo's "
                                     "hour windows are not joined; use chunking 'pauses'")
                report = (lambda done, total, name=source.name: progress(name, done, total)) if progress else None
                output = transcribe_chunks(model, source, method, window, decode_batch, batch_size,
                                           long_form.pause_rule, report)
                results[index] = join_chunks(reader, output, source.name, source.seconds, times)
            else:
                pending.append((index, source.name, source.read(0, source.num_samples)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return [results[index] for index in sorted(results)]


def warn(transcripts: Sequence[Transcript], stacklevel: int = 3) -> None:
    """Each transcript's warnings as a `TranscriptWarning` (the public API's way of not being silent)."""
    for transcript in transcripts:
        for message in transcript.warnings:
            warnings.warn(message, TranscriptWarning, stacklevel=stacklevel)
