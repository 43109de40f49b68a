"""NeMo's text and timestamps for SentencePiece vocabularies, shared by the heads that emit one token at a time
(CTC, transducers): the transcript's text (a space before a punctuation mark of the vocabulary removed), and a
transducer hypothesis's token and word offsets as NeMo 3.0's `transcribe(timestamps=True)` gives them
(parts/submodules/rnnt_decoding.py `compute_rnnt_timestamps`, parts/utils/timestamp_utils.py `get_words_offsets`).

- A token starts at the frame it was emitted on and ends one frame later (RNNT) or `duration` frames later
  (TDT); a TDT punctuation token is moved to the end of the token before it.
- Words: a piece whose text differs from the piece itself (it carries SentencePiece's word mark) starts a word
  unless it is punctuation; punctuation joins the word before it; a word's text is its pieces decoded together.
Segments are the shared rule (aed/timestamps.py frame_segments), NeMo's get_segment_offsets without a gap.
- Text: the ids decoded, then one space before a punctuation mark of the vocabulary removed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from .tokenizer import Tokenizer

# NeMo's default word_seperator (RNNTDecodingConfig).
WORD_SEPARATOR = " "
# Pieces NeMo's extract_punctuation_from_vocab does not read punctuation from.
_SPECIAL_PIECE = [re.compile(pattern) for pattern in (r"^\[.*\]$", r"^<.*>$", r"^##", r"^▁", r"^\s*$")]


@dataclass(frozen=True)
class Offset:
    """A token, word or segment with NeMo's start and end offsets in encoder frames."""

    text: str
    start: int
    end: int


def vocabulary_punctuation(pieces: Sequence[str]) -> frozenset[str]:
    """NeMo's extract_punctuation_from_vocab: every Unicode punctuation character of a piece that is not special
    (bracketed, <...>, a word-initial or ## piece, or blank)."""
    return frozenset(char for piece in pieces if not any(pattern.match(piece) for pattern in _SPECIAL_PIECE)
                     for char in piece if unicodedata.category(char).startswith("P"))


@dataclass(frozen=True)
class TimedToken:
    """One emitted token: its id, its piece, its text decoded alone, and NeMo's start and end frames."""

    id: int
    piece: str
    text: str
    start: int
    end: int


class PieceText(Protocol):
    """A token as get_words_offsets reads it: its piece, and its text decoded alone."""

    piece: str
    text: str


@dataclass(frozen=True)
class WordSpan:
    """One word of NeMo's get_words_offsets, by token index: `pieces` make its text, decoded together; `marks`
    are punctuation tokens that joined it after it was closed; its offsets run from token `first` to token
    `end_token`."""

    pieces: tuple[int, ...]
    first: int
    last: int  # the token before the next word
    marks: tuple[int, ...] = ()

    @property
    def end_token(self) -> int:
        """NeMo moves a word's end offset to a mark that joins it (and only the offset: not the seconds)."""
        return self.marks[-1] if self.marks else self.last

    def text(self, decoded: str, tokens: Sequence[PieceText]) -> str:
        """The word's text from its pieces decoded together: each joined mark appended, one space before it
        removed."""
        for mark in self.marks:
            decoded = decoded.removesuffix(" ") + tokens[mark].text
        return decoded


def word_spans(tokens: Sequence[PieceText], punctuation: frozenset[str]) -> list[WordSpan]:
    """NeMo's get_words_offsets for a SentencePiece ("bpe") vocabulary and the space word separator, as token
    indices. `punctuation`: its supported_punctuation (the vocabulary's marks for a model's own timestamps; the
    chunk merge passes `, . ! ?`)."""
    spans: list[WordSpan] = []
    built: list[int] = []
    first = 0
    for i, token in enumerate(tokens):
        text = token.text
        is_punctuation = text in punctuation and text != WORD_SEPARATOR
        # The next token's text that is neither empty nor the separator (NeMo's next_non_delimeter_token).
        following = next((later.text for later in tokens[i + 1:] if later.text and later.text != WORD_SEPARATOR),
                         None)
        # A piece whose text differs from it carries the word mark (NeMo's bpe word-start condition).
        starts_word = token.piece != text or (text == WORD_SEPARATOR and following not in punctuation)
        if starts_word and not is_punctuation:
            if built:
                spans.append(WordSpan(tuple(built), first, i - 1))
            built = []
            if text != WORD_SEPARATOR:
                built, first = [i], i
        elif is_punctuation and not built and spans:
            # Punctuation after a finished word joins it.
            spans[-1] = replace(spans[-1], marks=spans[-1].marks + (i,))
        elif is_punctuation and built:
            if tokens[built[-1]].piece in (" ", "_", "\u2581"):
                built = built[:-1]
            built.append(i)
        else:
            if not built:
                first = i
            built.append(i)
    if built:
        spans.append(WordSpan(tuple(built), first, len(tokens) - 1))
    if spans:
        spans[0] = replace(spans[0], first=0)  # NeMo: the first word starts where the first token does
    return spans


class SubwordText:
    """Text and offsets from ids for one SentencePiece vocabulary, with NeMo's rules."""

    def __init__(self, pieces: Sequence[str], decode: Callable[[list[int]], str]):
        self.pieces = list(pieces)
        self.decode = decode  # ids -> text, NeMo's tokens_to_text of their pieces
        self.punctuation = vocabulary_punctuation(self.pieces)
        # NeMo removes one whitespace before a punctuation mark of the vocabulary.
        self._space_before = (re.compile(r"(\s)(" + "|".join(re.escape(p) for p in sorted(self.punctuation)) + ")")
                              if self.punctuation else None)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SubwordText:
        """The rules for a converted folder's tokenizer (its pieces, and its own decoding of ids)."""
        return cls([tokenizer.id_to_piece(index) for index in range(tokenizer.vocab_size)], tokenizer.decode)

    def text(self, ids: Sequence[int]) -> str:
        """NeMo's decode_tokens_to_str_with_strip_punctuation."""
        text = self.decode(list(ids))
        return self._space_before.sub(r"\2", text) if self._space_before is not None else text

    def tokens(self, ids: Sequence[int], frames: Sequence[int], durations: Sequence[int] | None) -> list[TimedToken]:
        """NeMo's char offsets: each token from its frame to the next (RNNT) or `duration` frames on (TDT), where
        a punctuation token is moved to the end of the token before it and lasts no frame."""
        found = []
        for index, (token, frame) in enumerate(zip(ids, frames)):
            text = self.decode([token])
            end = frame + (durations[index] if durations is not None else 1)
            if durations is not None and index and text in self.punctuation:
                # TDT (_refine_timestamps_tdt): punctuation can be predicted long after the word it ends.
                frame = end = found[-1].end
            found.append(TimedToken(token, self.pieces[token], text, frame, end))
        return found

    def words(self, tokens: Sequence[TimedToken]) -> list[Offset]:
        """NeMo's get_words_offsets with the vocabulary's punctuation: each word's text its pieces decoded together."""
        return [Offset(span.text(self.decode([tokens[k].id for k in span.pieces]), tokens), tokens[span.first].start,
                       tokens[span.end_token].end) for span in word_spans(tokens, self.punctuation)]
