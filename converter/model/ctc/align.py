"""NeMo Forced Aligner's Viterbi alignment of a known text to CTC log-probabilities, as NeMo 3.0 uses it for
canary-1b-v2's word and segment timestamps.

`get_forced_aligned_timestamps_with_external_model` (nemo/collections/asr/parts/utils/timestamp_utils.py)
tokenises the transcript with the aligner's tokenizer (aligner_utils.get_utt_obj), runs `viterbi_decoding`
over the aligner's log-probabilities, turns the path into times (add_t_start_end_to_utt_obj) and snaps
punctuation to the token before it. This module makes the same decisions:

- the text is whitespace-normalised, cut into segments after `.`, `?` or `!` followed by a space, each
  segment into words at single spaces; each word is tokenised alone (SentencePiece pieces and ids), with
  NeMo's handling of the unknown-piece mark `⁇`; the target is blank, token, blank, token, ..., blank;
- a text with more tokens than frames (or no text) is not aligned: no words, no segments; nor (where we
  differ from NeMo) a text no CTC path fits, as when repeated tokens need more blanks than there are frames:
  NeMo reports what its padding scores lead to there (a start of -1, an end at the last frame);
- Viterbi runs over (batch, target position) at once, one step per frame, in float32 with NeMo's padding
  value and masks, ties to the lowest candidate (stay, then one back, then two back);
- times: a word starts at the frame where the path first reaches its first token and ends after the last
  frame on its last token, times frame duration (window stride x subsampling); offsets are NeMo's
  `int(seconds / frame duration)` and seconds are rounded to 2 decimals, as NeMo reports them;
- a word ending in a punctuation token (`,` `.` `!` `?` alone) ends where the token before it ends;
- for overlapping chunks NeMo asks for its "char" timestamps instead: the whole text tokenised and aligned
  as one segment of one word, each token timed (a punctuation token snapped to the end of the one before it,
  across words too): `align_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..speech import AlignedToken, FrameWord
from ..tokenizer import BPETokenizer
from .model import CTCModel

# NeMo's defaults in get_forced_aligned_timestamps_with_external_model (its "..." never matches one character).
SEGMENT_SEPARATORS = (".", "?", "!", "...")
SUPPORTED_PUNCTUATION = frozenset({",", ".", "!", "?"})
# viterbi_decoding's padding_value: the lowest float32, standing for "impossible".
PADDING = np.float32(-3.4e38)


@dataclass
class _Token:
    text: str  # the SentencePiece piece (NeMo's token.text)
    position: int  # its index in the target (blank, token, blank, ...)
    id: int
    start: float = -1.0  # seconds, or -1 where the path skips it
    end: float = -1.0


@dataclass
class _Word:
    text: str
    first: int  # target positions of its first and last token
    last: int
    tokens: list[_Token] = field(default_factory=list)
    start: float = -1.0
    end: float = -1.0


@dataclass
class _Segment:
    text: str
    first: int
    last: int
    words: list[_Word] = field(default_factory=list)
    start: float = -1.0
    end: float = -1.0


@dataclass
class Utterance:
    """A transcript laid out for alignment: the target ids (blanks between and around every token) and
    its segments, words and tokens with their target positions."""

    targets: list[int]
    segments: list[_Segment]


def _word_pieces(word: str, tokenizer: BPETokenizer, unknown_word: str) -> tuple[list[str], list[int]]:
    """A word's pieces and ids, tokenised alone; NeMo splits at the unknown mark and puts the unknown id there."""
    if word == unknown_word:
        return [tokenizer.unk_piece], [tokenizer.unk_id]
    if unknown_word not in word:
        return tokenizer.encode_pieces(word), tokenizer.encode_text(word)
    pieces: list[str] = []
    ids: list[int] = []
    for part in word.split(unknown_word):
        pieces += tokenizer.encode_pieces(part) + [tokenizer.unk_piece]
        ids += tokenizer.encode_text(part) + [tokenizer.unk_id]
    return pieces[:-1], ids[:-1]


def split_segments(text: str) -> list[str]:
    """NeMo's get_utt_obj: a segment ends at a separator character that a space follows."""
    segments, last = [], -1
    for index, letter in enumerate(text):
        following = text[index + 1] if index + 1 < len(text) else ""
        if letter in SEGMENT_SEPARATORS and following == " ":
            segments.append(text[last + 1: index + 1].strip())
            last = index + 1
    if last < len(text):
        segments.append(text[last + 1:].strip())
    return [segment for segment in segments if segment]


def utterance(text: str, tokenizer: BPETokenizer, frames: int, whole: bool = False) -> Utterance:
    """NeMo's get_utt_obj for a SentencePiece aligner: the target and the segment/word/token layout. No text,
    or more tokens than frames, gives the blank alone and no segments (NeMo aligns nothing then). `whole`:
    no segment or word separators (NeMo's "char" timestamps), the text is one segment of one word."""
    blank = tokenizer.vocab_size
    text = " ".join(text.split())
    if not text or len(tokenizer.encode_text(text)) > frames:
        return Utterance([blank], [])
    unknown_word = tokenizer.decode([tokenizer.unk_id]).strip()
    targets = [blank]
    segments: list[_Segment] = []
    segment_first = word_first = 1
    for segment_text in [text] if whole else split_segments(text):
        # The segment's span counts its tokens as NeMo does: the segment tokenised whole between unknown marks.
        parts = segment_text.split(unknown_word)
        count = sum(len(tokenizer.encode_pieces(part.strip())) for part in parts) + len(parts) - 1
        segment = _Segment(segment_text, segment_first, segment_first + 2 * count - 2)
        segment_first = segment.last + 2
        segments.append(segment)
        for word_text in [segment_text] if whole else segment_text.split(" "):
            pieces, ids = _word_pieces(word_text, tokenizer, unknown_word)
            word = _Word(word_text, word_first, word_first + 2 * len(pieces) - 2)
            word_first = word.last + 2
            segment.words.append(word)
            for piece, token_id in zip(pieces, ids):
                targets += [token_id, blank]
                word.tokens.append(_Token(piece, len(targets) - 2, token_id))
    return Utterance(targets, segments)


def viterbi(logprobs: np.ndarray, frames: np.ndarray, targets: list[list[int]]) -> list[list[int] | None]:
    """NeMo's viterbi_decoding: per utterance, the target position the best path is on at each frame; None
    where no CTC path fits the frames (repeated tokens need a blank between them, so a text can have fewer
    tokens than frames and still not fit: NeMo then follows its padding scores to a meaningless path).

    `logprobs` (B, T, V+1) float32, `frames` (B,) valid frame counts, `targets` per utterance (blank-padded
    token ids). One step per frame over the whole (B, U) lattice at once.
    """
    batch, steps, classes = logprobs.shape
    lengths = np.array([len(row) for row in targets])
    width = int(lengths.max())
    # Beyond the audio every class is PADDING; padded target positions read the extra PADDING class.
    padded = np.full((batch, steps, classes + 1), PADDING, dtype=np.float32)
    for row in range(batch):
        padded[row, : frames[row], :classes] = logprobs[row, : frames[row]]
    y = np.full((batch, width), classes, dtype=np.int64)
    for row, ids in enumerate(targets):
        y[row, : len(ids)] = ids
    rows = np.arange(batch)[:, None]
    scores = np.full((batch, width), PADDING, dtype=np.float32)
    scores[:, :2] = padded[rows, 0, y[:, :2]]
    back = np.full((batch, steps, width), -99, dtype=np.int8)
    # Two back is allowed only between different ids (never blank to blank, never over a blank between repeats).
    repeat = np.zeros((batch, width), dtype=bool)
    repeat[:, 2:] = y[:, 2:] == y[:, :-2]
    positions = np.arange(width)[None, :]
    final = (positions == lengths[:, None]) | (positions == lengths[:, None] - 1)
    for t in range(1, steps):
        # PADDING + PADDING overflows to -inf in float32, as in NeMo's torch code: both mean "impossible".
        emit = padded[rows, t, y]
        # Past an utterance's end its final positions stay free (NeMo multiplies their emissions by 0).
        emit = emit * ~((t >= frames)[:, None] & final)
        one_back = np.empty_like(scores)
        one_back[:, 0], one_back[:, 1:] = PADDING, scores[:, :-1]
        two_back = np.empty_like(scores)
        two_back[:, :2], two_back[:, 2:] = PADDING, scores[:, :-2]
        two_back[repeat] = PADDING
        with np.errstate(over="ignore"):
            candidates = np.stack([scores, one_back, two_back], axis=2) + emit[:, :, None]
        choice = candidates.argmax(axis=2)  # the first of equal candidates, as torch.max on CPU
        scores = np.take_along_axis(candidates, choice[:, :, None], axis=2)[:, :, 0]
        back[:, t] = choice
    paths: list[list[int] | None] = []
    for row in range(batch):
        length = int(lengths[row])
        position = 0 if length == 1 else int(np.argmax(scores[row, length - 2: length])) + length - 2
        if length > 1 and not scores[row, position] > PADDING / 2:  # every path took an impossible step
            paths.append(None)
            continue
        path = [position]
        for t in range(steps - 1, 0, -1):
            position -= int(back[row, t, position])
            path.append(position)
        paths.append(path[::-1][: int(frames[row])])
    return paths


def _times(item: _Token | _Word | _Segment, first: dict[int, int], last: dict[int, int], duration: float) -> None:
    """add_t_start_end_to_utt_obj: seconds from the first frame on the item's first position to the end of
    the last frame on its last position; -1 for a position the path skips."""
    start, end = (item.position, item.position) if isinstance(item, _Token) else (item.first, item.last)
    item.start = first[start] * duration if start in first else -1
    item.end = (last[end] + 1) * duration if end in last else -1


def _offset(seconds: float, duration: float) -> int:
    # NeMo's int(t / duration), which the float division can take one frame short (0.24 / 0.08 -> 2).
    return int(seconds / duration) if seconds != -1 else -1


def _timed(text: str, start: float, end: float, duration: float) -> FrameWord:
    return FrameWord(text, _offset(start, duration), _offset(end, duration), round(start, 2), round(end, 2))


def _ending(item: FrameWord, seconds: float, duration: float) -> FrameWord:
    return FrameWord(item.text, item.start, _offset(seconds, duration), item.start_seconds, seconds)


def timed_words(layout: Utterance, path: list[int], duration: float) -> tuple[list[FrameWord], list[FrameWord]]:
    """Words and segments with NeMo's offsets and seconds from an alignment path (punctuation snapped)."""
    first, last = _path_frames(path)
    words: list[FrameWord] = []
    segments: list[FrameWord] = []
    for segment in layout.segments:
        _times(segment, first, last, duration)
        segment_end = segment.end
        segments.append(_timed(segment.text, segment.start, segment.end, duration))
        for word in segment.words:
            _times(word, first, last, duration)
            for token in word.tokens:
                _times(token, first, last, duration)
            words.append(_timed(word.text, word.start, word.end, duration))
            for index, token in enumerate(word.tokens):
                if token.text not in SUPPORTED_PUNCTUATION:
                    continue
                before = word.tokens[index - 1] if index > 0 else None
                snapped = round(before.end, 2) if before is not None else round(token.start, 2)
                if segment_end == word.end:
                    segments[-1] = _ending(segments[-1], snapped, duration)
                if word.end == token.end:
                    words[-1] = _ending(words[-1], snapped, duration)
                token.start = token.end = snapped
    return words, segments


def _path_frames(path: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """The first and last frame the path spends on each target position it visits."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    previous = -1
    for t, position in enumerate(path):
        if position > previous:
            first[position] = t
            if previous >= 0:
                last[previous] = t - 1
        previous = position
    last[previous] = len(path) - 1
    return first, last


def timed_tokens(layout: Utterance, path: list[int], duration: float, tokenizer: BPETokenizer) -> list[AlignedToken]:
    """NeMo's "char" timestamps of a `whole` layout: every token's offsets and rounded seconds, a punctuation
    token's start and end both snapped to the rounded end of the token before it."""
    first, last = _path_frames(path)
    timed = []
    for segment in layout.segments:
        for word in segment.words:
            for index, token in enumerate(word.tokens):
                _times(token, first, last, duration)
                if token.text in SUPPORTED_PUNCTUATION:
                    before = word.tokens[index - 1] if index > 0 else None
                    token.start = token.end = round(before.end, 2) if before is not None else round(token.start, 2)
                timed.append(AlignedToken(token.id, token.text, tokenizer.decode([token.id]),
                                          _offset(token.start, duration), _offset(token.end, duration),
                                          round(token.start, 2), round(token.end, 2)))
    return timed


def align_tokens(logprobs: np.ndarray, frames: np.ndarray, texts: list[str], tokenizer: BPETokenizer,
                 duration: float) -> list[list[AlignedToken]]:
    """Per utterance of a batch, its whole text's tokens aligned as one piece (none where nothing aligns)."""
    layouts = [utterance(text, tokenizer, int(count), whole=True) for text, count in zip(texts, frames)]
    paths = viterbi(logprobs, frames, [layout.targets for layout in layouts])
    return [timed_tokens(layout, path, duration, tokenizer) if path is not None else []
            for layout, path in zip(layouts, paths)]


def align(logprobs: np.ndarray, frames: np.ndarray, texts: list[str], tokenizer: BPETokenizer,
          duration: float) -> list[tuple[list[FrameWord], list[FrameWord]]]:
    """Per utterance of a batch, the words and segments of its text aligned to its CTC log-probabilities."""
    layouts = [utterance(text, tokenizer, int(count)) for text, count in zip(texts, frames)]
    paths = viterbi(logprobs, frames, [layout.targets for layout in layouts])
    return [timed_words(layout, path, duration) if path is not None else ([], [])
            for layout, path in zip(layouts, paths)]


@dataclass(frozen=True)
class TimestampAligner:
    """canary-1b-v2's timestamp model, loaded from the folder's `aligner/`: it aligns the Canary's text to the
    audio (a dataclass, not a module, so the aligner's weights stay out of the Canary's parameter tree)."""

    model: CTCModel

    @property
    def frame_seconds(self) -> float:
        """NeMo's output_timestep_duration: the aligner's window stride times its subsampling."""
        return self.model.config.preprocessor.window_stride * self.model.config.encoder.subsampling_factor

    def logprobs(self, samples: mx.array, counts: mx.array) -> tuple[np.ndarray, np.ndarray]:
        """The aligner's per-frame log-probabilities (B, T, V+1) and valid frame counts for a batch of audio."""
        logprobs, frames = self.model.logprobs(*self.model.preprocess(samples, counts))
        return np.array(logprobs.astype(mx.float32)), np.array(frames).astype(np.int64)

    @property
    def tokenizer(self) -> BPETokenizer:
        tokenizer = self.model.tokenizer
        if not isinstance(tokenizer, BPETokenizer):
            raise ValueError("the timestamp aligner needs its SentencePiece tokenizer")
        return tokenizer

    def align(self, samples: mx.array, counts: mx.array, texts: list[str]) -> list[tuple[list[FrameWord], list[FrameWord]]]:
        """Per row of the batch, its text's words and segments (NeMo's offsets and seconds)."""
        logprobs, frames = self.logprobs(samples, counts)
        return align(logprobs, frames, texts, self.tokenizer, self.frame_seconds)

    def align_both(self, samples: mx.array, counts: mx.array, texts: list[str]
                   ) -> tuple[list[tuple[list[FrameWord], list[FrameWord]]], list[list[AlignedToken]]]:
        """`align`, and each text's tokens aligned whole (`align_tokens`), from one run of the aligner: what an
        overlapping chunk needs, since which chunks overlap is the application's business."""
        logprobs, frames = self.logprobs(samples, counts)
        return (align(logprobs, frames, texts, self.tokenizer, self.frame_seconds),
                align_tokens(logprobs, frames, texts, self.tokenizer, self.frame_seconds))
