"""Joining the token sequences of overlapping chunks, as NeMo 3.0 does for its parallel long-form path.

`EncDecMultiTaskModel.transcribe` cuts a long file into chunks that overlap by one second, decodes them
together and joins the results with `merge_parallel_chunks` (nemo/collections/asr/parts/utils/
chunking_utils.py): the first tokens of each chunk are aligned against the end of what is merged so far by
`lcs_alignment_merge_buffer` / `longest_common_subsequence_merge` (streaming_utils.py, parallel mode), and
the duplicate stretch is dropped. This module reproduces that decision token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

from ..speech import AlignedToken, Decoded, FrameWord
from ..subwords import word_spans
from ..tokenizer import BPETokenizer

if TYPE_CHECKING:
    from ..ctc.align import TimestampAligner

# NeMo's MIN_MERGE_SUBSEQUENCE_LEN: a leftmost common run this short is not trusted as an overlap.
MIN_MERGE_RUN = 1
# merge_parallel_chunks: search back over delay * 2 tokens of the merged text, align the first 60% of
# a second's worth of tokens of the next chunk, and need a common run of at least one token.
SEARCH_STEPS_PER_FRAME = 2
HEAD_FRACTION = 0.6
MIN_COMMON = 1


class _Runs:
    """runs[i][j]: how many tokens the common run ending at old[i - 1] and new[j - 1] holds (0: none)."""

    def __init__(self, old: Sequence[int], new: Sequence[int]):
        self.rows, self.cols = len(old), len(new)
        self.table = [[0] * (self.cols + 1) for _ in range(self.rows + 1)]
        for i in range(1, self.rows + 1):
            for j in range(1, self.cols + 1):
                if old[i - 1] == new[j - 1]:
                    self.table[i][j] = self.table[i - 1][j - 1] + 1

    def __call__(self, i: int, j: int) -> int:
        # NeMo would index past the table's last column in rare expansions (and fail); none is a run.
        return self.table[i][j] if 0 <= i <= self.rows and 0 <= j <= self.cols else 0


def _longest_run_end(runs: _Runs) -> tuple[int, int, int]:
    """The longest run's end cell, the last such cell in row-major order, and its length ((0, 0, 0): none)."""
    best = (0, 0, 0)
    for i in range(1, runs.rows + 1):
        for j in range(1, runs.cols + 1):
            if runs(i, j) and runs(i, j) >= best[2]:
                best = (i, j, runs(i, j))
    return best


def _leftmost_longest(runs: _Runs) -> tuple[int, int, int]:
    """Scanning old from its end and new from its start: the longest run with the smallest new index."""
    length, row, col = 0, runs.rows, -1
    for i in range(runs.rows, -1, -1):
        for j in range(runs.cols + 1):
            if runs(i, j) > length and j <= (col if col >= 0 else runs.cols):
                length, row, col = runs(i, j), i, j
    return length, row, col


def _partial_overlap(runs: _Runs) -> tuple[int, int, int]:
    """NeMo's three steps when the longest run does not reach the end of the old tokens: take the leftmost
    longest run, extend it diagonally towards the old end allowing one skipped token per row, then walk
    back to where it starts. Returns (old start, new start, tokens to slice)."""
    length, row, col = _leftmost_longest(runs)
    if length <= MIN_MERGE_RUN:
        return row, 0, 0
    # Extend: each later old row looks along its diagonal, widened by the skips met so far.
    extension, skips, first = 0, 0, col + 1
    for i in range(row + 1, runs.rows + 1):
        missed = 0
        for j in range(first, first + skips + 1):
            if j <= runs.cols:
                if runs(i, j) == 0:
                    missed = 1
                else:
                    extension = 1 + skips + missed
        skips += missed
        first += 1
    col += extension
    # Walk back along the diagonal, stepping one extra column left wherever the run breaks.
    sliced, skipped = 0, 0
    while row > 0 and col > 0:
        if runs(row, col) == 0:
            col -= 1
            skipped += 1
        if col > 0:
            sliced += 1
            row -= 1
            col -= 1
    return max(0, row), max(0, col), sliced + skipped


def overlap(old: Sequence[int], new: Sequence[int]) -> tuple[int, int, int]:
    """Where `new` starts repeating the end of `old`: (old start, new start, overlap length)."""
    runs = _Runs(old, new)
    end_row, end_col, length = _longest_run_end(runs)
    if end_row == runs.rows:
        # The longest run reaches the end of the old tokens: a clean overlap, sliced whole.
        return end_row - length, end_col - length, length
    return _partial_overlap(runs)


def splice(merged: Sequence[int], head: Sequence[int], frames_per_second: int) -> tuple[int, int]:
    """How `head` (a chunk's first tokens) joins `merged`: keep merged[:keep], then head[skip:].

    NeMo's parallel mode drops the stretch both hold and, with it, whatever of the old copy follows it.
    """
    if frames_per_second < 1 or not merged:
        return len(merged), 0
    window = merged[-int(frames_per_second * SEARCH_STEPS_PER_FRAME):]
    old_start, new_start, length = overlap(window, head)
    if length < MIN_COMMON:
        return len(merged), 0
    # NeMo's partial branch can count past the end of the old tokens; its slice then keeps them all.
    return min(len(merged) - len(window) + old_start + length, len(merged)), new_start + length


def merge_chunk_tokens(chunks: Sequence[Sequence[int]], subsampling_factor: int) -> tuple[list[int], list[int]]:
    """Consecutive chunks' tokens (overlapping by one second) joined as merge_parallel_chunks joins them;
    also, for each merged token, the index of the chunk it comes from."""
    # NeMo's "delay": encoder frames in the one-second overlap, int(1 / (subsampling / 100)).
    frames_per_second = int(1 / (subsampling_factor / 100))
    head_size = int(frames_per_second * HEAD_FRACTION)
    merged: list[int] = []
    owners: list[int] = []
    for index, tokens in enumerate(chunks):
        tokens = list(tokens)
        if index == 0:
            merged, owners = tokens, [0] * len(tokens)
            continue
        keep, skip = splice(merged, tokens[:head_size], frames_per_second)
        merged = merged[:keep] + tokens[skip:head_size] + tokens[head_size:]
        owners = owners[:keep] + [index] * (len(merged) - keep)
    return merged, owners


# merge_parallel_chunks: each chunk after the first starts this many 10 ms feature frames (one second)
# before the end of the one before it.
OVERLAP_FEATURE_FRAMES = 100
# get_words_offsets: marks that join the word before them instead of starting one.
WORD_PUNCTUATION = frozenset({",", ".", "!", "?"})


def merge_aligned_chunks(chunks: Sequence[Decoded], subsampling_factor: int,
                         aligner: TimestampAligner) -> tuple[str, list[FrameWord]]:
    """Overlapping chunks' forced alignments joined as merge_parallel_chunks joins them with timestamps: the
    aligner's token ids (each chunk's whole text aligned as one piece) merged like the Canary's tokens (whose
    encoder's `subsampling_factor` sets the merge's window); the kept tokens' offsets shifted by the chunks'
    places, counted from the Canary's encoder lengths; words built from them (get_words_offsets). Returns the
    merged text and the words, offsets in the aligner's frames from the start of the file, with NeMo's
    (unrounded) seconds.

    Where we differ from NeMo (README, "Timestamps of canary-1b-v2"): NeMo decodes the merged ids and the
    words' pieces with the Canary's tokenizer, and counts the aligner's frames in the Canary's frame length;
    here the aligner's own are used, the ones they belong to. Where the two models share tokenizer and frame
    length, as canary-1b-v2's do, the results are the same.
    """
    merged, _ = merge_chunk_tokens([[token.id for token in chunk.aligned or []] for chunk in chunks],
                                   subsampling_factor)
    config = aligner.model.config
    timed = _join_aligned_tokens(chunks, merged, subsampling_factor, config.encoder.subsampling_factor,
                                 config.preprocessor.window_stride)
    return aligner.tokenizer.decode(merged), _words(timed, aligner.tokenizer)


def _join_aligned_tokens(chunks: Sequence[Decoded], merged: Sequence[int], canary_subsampling: int,
                         subsampling_factor: int, window_stride: float) -> list[AlignedToken]:
    """join_char_level_timestamps: walk each chunk's tokens in order, keep those that are the next merged id,
    shift them by the chunk's offset, never start before the kept token before ends; seconds are NeMo's
    `offset * window_stride * subsampling` (not rounded). A chunk starts one second (in feature frames) before
    the end of the one before it, whose length is its Canary encoder length times the Canary's subsampling."""
    kept: list[AlignedToken] = []
    shift = 0
    for index, chunk in enumerate(chunks):
        if index:
            previous = chunks[index - 1].encoded_frames or 0
            shift += (previous * canary_subsampling - OVERLAP_FEATURE_FRAMES) // subsampling_factor
        for token in chunk.aligned or []:
            if len(kept) >= len(merged) or token.id != merged[len(kept)]:
                continue
            start = token.start + shift if token.start != -1 else -1
            end = token.end + shift if token.end != -1 else -1
            if kept and start != -1 and start < kept[-1].end:
                start = end = kept[-1].end
            kept.append(AlignedToken(
                token.id, token.piece, token.text, start, end,
                -1 if start == -1 else start * window_stride * subsampling_factor,
                -1 if end == -1 else end * window_stride * subsampling_factor))
    return kept


def _words(tokens: Sequence[AlignedToken], tokenizer: BPETokenizer) -> list[FrameWord]:
    """get_words_offsets as merge_parallel_chunks calls it (`, . ! ?` join the word before them), with the
    seconds beside the offsets; each word's text its pieces decoded together."""
    return [FrameWord(span.text(tokenizer.decode_pieces([tokens[k].piece for k in span.pieces]), tokens),
                      tokens[span.first].start, tokens[span.end_token].end, tokens[span.first].start_seconds,
                      tokens[span.last].end_seconds) for span in word_spans(tokens, WORD_PUNCTUATION)]
