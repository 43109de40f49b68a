"""Where a long recording is cut: NeMo 3.0's two long-form rules, and our own cut at pauses.

* Fixed chunks (`frame_chunks`): NeMo's `FrameBatchMultiTaskAED` (nemo/collections/asr/parts/utils/
  streaming_utils.py) as NeMo's `speech_to_text_aed_chunked_infer.py` runs it for Canary checkpoints
  without a timestamps model: log-mel features of the whole file, cut every `chunk_len_in_secs` (40 s;
  the script switches to 10 s when timestamps are asked) into non-overlapping chunks, each normalised on
  its own, decoded `batch_size` at a time and joined end to end.
* Overlapping chunks (`parallel_chunks`): `EncDecMultiTaskModel.transcribe` with `enable_chunking`, which
  NeMo turns on only for checkpoints that carry their timestamps model (canary-1b-v2): the file is cut into
  one-hour windows, each window into equal chunks of 30 to 40 s overlapping by 1 s
  (`PromptedAudioToTextLhotseDataset._find_optimal_chunk_size` / `_chunk_waveform`, nemo/collections/asr/
  data/audio_to_text_lhotse_prompted.py), joined by `merge_parallel_chunks` (see merge.py).
* Pauses (`pause_chunks`): not NeMo's. Speech is found by frame energy and whole utterances are packed
  into chunks no longer than the window, so no chunk starts or ends inside a word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# FrameBatchMultiTaskAED's chunk length as the NeMo script sets it, and with timestamps.
FRAME_CHUNK_SECONDS = 40.0
FRAME_CHUNK_SECONDS_TIMESTAMPS = 10.0
# enable_chunking: one-hour windows (cut_into_windows_duration = cut_into_windows_hop = 3600), chunk sizes
# tried from 30 to 40 whole seconds, 1 s overlap.
PARALLEL_WINDOW_SECONDS = 3600
PARALLEL_MIN_SECONDS = 30
PARALLEL_MAX_SECONDS = 40
PARALLEL_OVERLAP_SECONDS = 1.0


@dataclass(frozen=True)
class Span:
    """[start, stop) in samples or feature frames."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def frame_chunks(num_frames: int, chunk_seconds: float, window_stride: float) -> list[Span]:
    """Feature-frame ranges of NeMo's AudioFeatureIterator: each ends at int(start + chunk / stride).

    NeMo then emits one more, empty, chunk when the frames divide evenly (and decodes nothing sensible for
    it); that one is left out here.
    """
    step = chunk_seconds / window_stride  # a float, as NeMo keeps it
    spans, start = [], 0
    while start < num_frames:
        stop = min(max(int(start + step), start + 1), num_frames)
        spans.append(Span(start, stop))
        start = stop
    return spans


def parallel_windows(num_samples: int, sample_rate: int) -> list[Span]:
    """The one-hour windows NeMo's dataloader cuts a long recording into before chunking each."""
    size = PARALLEL_WINDOW_SECONDS * sample_rate
    return [Span(start, min(start + size, num_samples)) for start in range(0, max(num_samples, 1), size)]


def parallel_chunk_size(total: int, sample_rate: int, max_seconds: int = PARALLEL_MAX_SECONDS,
                        min_seconds: int = PARALLEL_MIN_SECONDS) -> int:
    """NeMo's _find_optimal_chunk_size: of the whole-second sizes, the first that leaves the longest last chunk."""
    if total < max_seconds * sample_rate:
        return total
    overlap = int(PARALLEL_OVERLAP_SECONDS * sample_rate)
    best_size, best_last = min_seconds * sample_rate, 0
    for seconds in range(min_seconds, max_seconds + 1):
        size = seconds * sample_rate
        step = size - overlap
        if step <= 0 or size > total:
            continue
        count = (total + step - 1) // step
        last = total - step * (count - 1)
        if last > best_last:
            best_size, best_last = size, last
    return best_size


def parallel_chunks(total: int, size: int, sample_rate: int) -> list[Span]:
    """NeMo's _chunk_waveform: chunks of `size` samples every `size - 1 s` (each later padded to `size`)."""
    if size >= total:
        return [Span(0, total)]
    overlap = int(PARALLEL_OVERLAP_SECONDS * sample_rate)
    spans, start = [], 0
    while start + overlap < total:
        spans.append(Span(start, min(start + size, total)))
        start += size - overlap
    return spans


@dataclass(frozen=True)
class PauseRule:
    """How `pause_chunks` tells speech from pauses (levels in dB of each 10 ms frame's RMS).

    A frame is speech when it is `above_floor` dB over the quiet end of the file (its 10th percentile) and
    within `below_peak` dB of the loud end (99th percentile); quieter stretches of `min_pause` seconds or more
    separate utterances; each chunk keeps `lead` seconds before its first utterance and `trail` after its last
    (never more than half the pause to its neighbour).
    """

    frame_seconds: float = 0.01
    above_floor: float = 10.0
    below_peak: float = 35.0
    min_pause: float = 0.3
    min_speech: float = 0.1
    lead: float = 0.0
    trail: float = 0.5


def frame_levels(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS level in dB of each whole `frame`-sample frame."""
    count = samples.size // frame
    power = np.square(samples[: count * frame].reshape(count, frame), dtype=np.float64).mean(axis=1)
    return 10.0 * np.log10(power + 1e-20)


def _runs(mask: np.ndarray) -> list[Span]:
    """Runs of True, as frame spans."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [Span(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def speech_runs(levels: np.ndarray, rule: PauseRule) -> list[Span]:
    """Utterances in frames: loud frames, with gaps shorter than a pause closed and blips dropped."""
    if levels.size == 0:
        return []
    floor, peak = np.percentile(levels, 10), np.percentile(levels, 99)
    loud = levels > max(floor + rule.above_floor, peak - rule.below_peak)
    gap, blip = round(rule.min_pause / rule.frame_seconds), round(rule.min_speech / rule.frame_seconds)
    runs: list[Span] = []
    for run in _runs(loud):
        if runs and run.start - runs[-1].stop < gap:
            runs[-1] = Span(runs[-1].start, run.stop)
        else:
            runs.append(run)
    return [run for run in runs if run.size >= blip]


def speech_seconds(runs: list[Span], start: float, stop: float, frame_seconds: float) -> float:
    """Seconds of speech (`speech_runs`, in frames) inside [start, stop) seconds of the file."""
    first, last = start / frame_seconds, stop / frame_seconds
    return sum(max(0.0, min(run.stop, last) - max(run.start, first)) for run in runs) * frame_seconds


def _split_long(run: Span, levels: np.ndarray, limit: int) -> list[Span]:
    """An utterance longer than the window, cut at the quietest frame of each window's last quarter."""
    pieces, start = [], run.start
    while run.stop - start > limit:
        low = start + limit - max(limit // 4, 1)
        cut = low + int(np.argmin(levels[low : start + limit]))
        pieces.append(Span(start, cut))
        start = cut
    pieces.append(Span(start, run.stop))
    return pieces


def pause_chunks(levels: np.ndarray, rule: PauseRule, window_seconds: float, num_samples: int,
                 sample_rate: int) -> list[Span]:
    """Sample spans, each whole utterances (packed up to the window) with the rule's margins."""
    frame = round(rule.frame_seconds * sample_rate)
    limit = max(int(window_seconds / rule.frame_seconds), 1)
    pieces = [piece for run in speech_runs(levels, rule) for piece in _split_long(run, levels, limit)]
    groups: list[Span] = []
    for piece in pieces:
        # Pack whole utterances while the chunk, margins included, fits the window.
        margins = round((rule.lead + rule.trail) / rule.frame_seconds)
        if groups and piece.stop - groups[-1].start + margins <= limit:
            groups[-1] = Span(groups[-1].start, piece.stop)
        else:
            groups.append(piece)
    spans = []
    for index, group in enumerate(groups):
        before = groups[index - 1].stop if index else None
        after = groups[index + 1].start if index + 1 < len(groups) else None
        start = group.start * frame - _margin(rule.lead, before, group.start, frame, sample_rate)
        stop = group.stop * frame + _margin(rule.trail, after, group.stop, frame, sample_rate)
        spans.append(Span(max(start, 0), min(stop, num_samples)))
    return spans


def _margin(seconds: float, neighbour: int | None, edge: int, frame: int, sample_rate: int) -> int:
    """A margin in samples, at most half the pause to the neighbouring chunk."""
    margin = round(seconds * sample_rate)
    if neighbour is None:
        return margin
    return min(margin, abs(edge - neighbour) * frame // 2)

