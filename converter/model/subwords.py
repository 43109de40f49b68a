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
from dataclasses import dataclass

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
        """NeMo's get_words_offsets for a SentencePiece ("bpe") vocabulary and the space word separator."""
        punctuation = self.punctuation
        words: list[Offset] = []
        built: list[TimedToken] = []
        first = 0

        def close(last: int) -> Offset:
            return Offset(self.decode([token.id for token in built]), tokens[first].start, tokens[last].end)

        for i, token in enumerate(tokens):
            text = token.text
            is_punctuation = bool(punctuation) and text in punctuation and text != WORD_SEPARATOR
            # The next token's text that is not the separator (NeMo's next_non_delimeter_token).
            following = None
            ahead = i
            while not following and ahead < len(tokens) - 1:
                ahead += 1
                following = tokens[ahead].text if tokens[ahead].text != WORD_SEPARATOR else None
            # A piece whose text differs from it carries the word mark (NeMo's bpe word-start condition).
            starts_word = token.piece != text or (text == WORD_SEPARATOR and following not in punctuation)
            if starts_word and not is_punctuation:
                if built:
                    words.append(close(i - 1))
                built = []
                if text != WORD_SEPARATOR:
                    built = [token]
                    first = i
            elif is_punctuation and not built and words:
                # Punctuation after a finished word joins it.
                last = words[-1]
                word = last.text[:-1] if last.text.endswith(" ") else last.text
                words[-1] = Offset(word + text, last.start, token.end)
            elif is_punctuation and built:
                if built[-1].piece in (" ", "_", "▁"):
                    built = built[:-1]
                built.append(token)
            else:
                if not built:
                    first = i
                built.append(token)
        if not words:
            if built:
                first = 0
                words.append(close(len(tokens) - 1))
        else:
            # NeMo: the first word starts where the first token does.
            words[0] = Offset(words[0].text, tokens[0].start, words[0].end)
            if built:
                words.append(close(len(tokens) - 1))
        return words
