"""Transcripts written out: plain text, JSON, SubRip (.srt) and WebVTT (.vtt).

Subtitle cues are the model's own segments when it wrote timestamps, otherwise the chunks the audio was
decoded in, each with its time span (one cue for a short clip).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .model.aed.timestamps import TimedText
from .model.app.transcribe import Transcript

FORMATS = ("txt", "json", "srt", "vtt")


def _timed(item: TimedText, key: str = "text") -> dict[str, Any]:
    return {key: item.text, "start": round(item.start, 3), "end": round(item.end, 3)}


def to_record(transcript: Transcript) -> dict[str, Any]:
    """Everything known about one transcript, as JSON-ready data (times in seconds)."""
    return {
        "audio": transcript.source,
        "text": transcript.text,
        "tokens": transcript.tokens,
        "seconds": round(transcript.seconds, 3),
        "truncated": transcript.truncated,
        "over_window": transcript.over_window,
        "sparse_chunks": list(transcript.sparse_chunks),
        "warnings": list(transcript.warnings),
        "timestamps": transcript.timestamps,
        "segments": [_timed(segment) for segment in transcript.segments],
        "words": [_timed(word, "word") for word in transcript.words],
        "chunks": [{"start": round(chunk.start, 3), "end": round(chunk.end, 3), "text": chunk.text,
                    "ended_on_eos": chunk.ended} for chunk in transcript.chunks],
    }


def to_json(transcripts: Sequence[Transcript]) -> str:
    return json.dumps([to_record(transcript) for transcript in transcripts], ensure_ascii=False)


def cues(transcript: Transcript) -> list[TimedText]:
    """The subtitle cues: segments with times when the model gave them, else the decoded chunks."""
    if transcript.timestamps and transcript.segments:
        return list(transcript.segments)
    return [TimedText(chunk.text, chunk.start, chunk.end) for chunk in transcript.chunks if chunk.text]


def _clock(seconds: float, separator: str) -> str:
    millis = max(round(seconds * 1000), 0)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{separator}{millis:03d}"


def to_srt(transcript: Transcript) -> str:
    blocks = [f"{number}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{cue.text}\n"
              for number, cue in enumerate(cues(transcript), 1)]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n{cue.text}\n" for cue in cues(transcript)]
    return "\n".join(["WEBVTT\n", *blocks])


def to_text(transcript: Transcript) -> str:
    return transcript.text.strip() + "\n"


def render(transcript: Transcript, fmt: str) -> str:
    """One transcript in `fmt` (a file's worth: JSON is a one-element list)."""
    return {"txt": to_text, "json": lambda t: to_json([t]) + "\n", "srt": to_srt, "vtt": to_vtt}[fmt](transcript)
