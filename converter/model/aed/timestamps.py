"""Word and segment times from the frame tokens canary2 models emit when their prompt asks for timestamps.

With `<|timestamp|>` in the prompt, canary-1b-flash and canary-180m-flash write each word between two
frame tokens, `<|start|> word <|end|>`, counted in encoder frames. This follows NeMo 3.0's
`process_aed_timestamp_outputs` (nemo/collections/asr/parts/utils/timestamp_utils.py): the same reading
of the decoded text, the same word and segment rules, the same frame-to-seconds arithmetic.
"""

from __future__ import annotations

import re

from ..speech import FrameWord, TimedText
from ..tokenizer import Tokenizer

# NeMo finds words as `<|a|>content<|b|>`, leftmost first, each pair consumed whole.
_TIMED_WORD = re.compile(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>")
# A segment ends with a word whose last character is one of these (NeMo's segment_delimiter_tokens).
SEGMENT_END = (".", "?", "!")
FIRST_FRAME_TOKEN = "<|0|>"


def has_frame_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary holds NeMo's frame tokens `<|0|>`, `<|1|>`, ... (canary2 flash models do)."""
    return FIRST_FRAME_TOKEN in tokenizer.special_tokens


def split_timed_text(text: str) -> tuple[list[FrameWord], str]:
    """Decoded text with frame tokens -> its timed words and the text without the tokens.

    As NeMo: the text is stripped; without a single `<|a|>...<|b|>` pair it is returned as is, with no
    words; otherwise only the contents of the pairs survive, stripped, joined by single spaces (empty
    contents give no word).
    """
    text = text.strip()
    words = [FrameWord(match.group(2).strip(), int(match.group(1)), int(match.group(3)))
             for match in _TIMED_WORD.finditer(text)]
    if not words:
        return [], text
    words = [word for word in words if word.text]
    return words, " ".join(word.text for word in words)


def frame_segments(words: list[FrameWord]) -> list[FrameWord]:
    """Words grouped into segments that end at a word ending in `.`, `?` or `!` (NeMo's get_segment_offsets)."""
    segments: list[FrameWord] = []
    pending: list[FrameWord] = []
    for word in words:
        pending.append(word)
        if word.text.endswith(SEGMENT_END):  # NeMo checks no empty word
            segments.append(_segment(pending))
            pending = []
    if pending:
        segments.append(_segment(pending))
    return segments


def _segment(words: list[FrameWord]) -> FrameWord:
    return FrameWord(" ".join(word.text for word in words), words[0].start, words[-1].end, words[0].start_seconds,
                     words[-1].end_seconds)


def to_seconds(items: list[FrameWord], window_stride: float, subsampling_factor: int,
               frame_offset: int = 0, seconds_offset: float = 0.0) -> list[TimedText]:
    """Offsets (shifted by `frame_offset` encoder frames) to seconds, NeMo's `offset * stride * subsampling`;
    an item that carries NeMo's own seconds (a forced alignment) keeps them, shifted alike."""
    frame = window_stride * subsampling_factor

    def seconds(offset: int, own: float | None) -> float:
        if own is not None:
            return seconds_offset + frame_offset * frame + own if (frame_offset or seconds_offset) else own
        return seconds_offset + (offset + frame_offset) * window_stride * subsampling_factor

    return [TimedText(item.text, seconds(item.start, item.start_seconds), seconds(item.end, item.end_seconds))
            for item in items]
