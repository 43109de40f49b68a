"""Timestamps on a canary2 model whose tokenizer has NeMo's frame tokens <|0|> .. <|299|>.

A random tiny model does not write sensible `<|start|> word <|end|>` sequences (it repeats a token or two),
so the test is split in two:
* the reading of frame tokens is checked on token sequences built to look like a trained model's output
  (words between rising frame tokens, punctuation ending segments, over several fixed chunks) and on
  malformed ones (empty contents, a lone frame token): our words, segments and text against NeMo's
  process_aed_timestamp_outputs and FrameBatchMultiTaskAED._join_hypotheses on the same tokens, plus times
  that rise and fall inside the audio for the well-formed ones;
* the whole path (timestamp flag in the prompt, 10 s chunks, decoding) against NeMo on real audio, where
  the random model's tokens, whatever they are, must come out the same, text and times included.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
from nemo.collections.asr.parts.utils.streaming_utils import FrameBatchMultiTaskAED
from nemo.collections.asr.parts.utils.timestamp_utils import process_aed_timestamp_outputs
from omegaconf import OmegaConf

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.model.app.chunking import Span
from canary_convert.model.aed.decoding import Decoded
from canary_convert.model.app.longform import ChunkOutput, LongFormOutput, chunk_frame_offsets
from canary_convert.model.aed.timestamps import TimedText
from canary_convert.model.app.transcribe import TextReader, Transcript, join_chunks
from canary_convert.parity import nemo_prompt_slots, restore_nemo
from factory import VARIANTS, build
from long_inputs import long_signal, nemo_frame_batch, write

FRAMES = 300
STRIDE = 0.01


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = tmp_path_factory.mktemp("frames")
    spec = replace(VARIANTS["canary2-proj-sub4"], name="canary2-frames", frame_tokens=FRAMES, seed=4)
    nemo_file = build(spec, folder / "frames.nemo")
    return restore_nemo(nemo_file), load_model(convert(str(nemo_file), folder / "mlx", ConvertOptions()).out)


def _frame(nemo: Any, offset: int) -> int:
    return nemo.tokenizer.spl_token_to_id(str(offset))


def _timed_chunk(nemo: Any, words: list[str], rng: np.random.Generator, frames: int) -> list[int]:
    """Each word between a start and an end frame token, frames rising and staying below `frames`."""
    ids, frame = [], int(rng.integers(0, 10))
    for word in words:
        length = int(rng.integers(3, 9))
        ids += [_frame(nemo, frame), *nemo.tokenizer.text_to_ids(word, "en"), _frame(nemo, frame + length)]
        frame += length + int(rng.integers(0, 4))
    assert frame < frames
    return ids


SENTENCES = ["the cat sat.", "on the mat?", "hello world this is a small test!", "seven eight nine ten",
             "a quick brown fox.", "jumps over the lazy dog"]


def _well_formed(nemo: Any, encoder_frames: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [_timed_chunk(nemo, " ".join(SENTENCES[index : index + 3]).split(), rng, frames)
            for index, frames in enumerate(encoder_frames)]


def _malformed(nemo: Any) -> list[list[int]]:
    words = nemo.tokenizer.text_to_ids("the cat sat.", "en")
    return [
        [_frame(nemo, 3), _frame(nemo, 5), *words, _frame(nemo, 9)],  # an empty pair, then a word
        [*words, _frame(nemo, 2)],  # no pair at all: the text stays as decoded
        [_frame(nemo, 1), *words, _frame(nemo, 4), _frame(nemo, 6)],  # a lone frame token at the end
        [],
    ]


def _nemo_join(nemo: Any, chunks: list[list[int]], sizes: list[int]) -> Hypothesis:
    """NeMo's reading of each chunk (process_aed_timestamp_outputs) and its join of fixed chunks."""
    hypotheses = nemo.decoding.decode_hypothesis(
        [Hypothesis(score=0.0, y_sequence=torch.tensor(ids, dtype=torch.long)) for ids in chunks])
    hypotheses = process_aed_timestamp_outputs(hypotheses, nemo.encoder.subsampling_factor, STRIDE)
    frame_asr = FrameBatchMultiTaskAED(nemo, frame_len=10.0, total_buffer=10.0, batch_size=4)
    frame_asr.chunk_offsets = [0, *sizes]
    return frame_asr._join_hypotheses(hypotheses, timestamps=True)


def _ours(model: Any, chunks: list[list[int]], sizes: list[int]) -> Transcript:
    spans, start = [], 0
    for size in sizes:
        spans.append(Span(start, start + size))
        start += size
    output = LongFormOutput("frames", [ChunkOutput(s.start * STRIDE, s.stop * STRIDE, Decoded(ids, True))
                                       for s, ids in zip(spans, chunks)], [list(range(len(chunks)))],
                            chunk_frame_offsets(spans, model.config.encoder.subsampling_factor))
    return join_chunks(TextReader(model, model.tokenizer, True), output, "audio", start * STRIDE,
                       (STRIDE, model.config.encoder.subsampling_factor))


def _as_nemo(items: tuple[TimedText, ...]) -> list[tuple[str, float, float]]:
    return [(item.text, item.start, item.end) for item in items]


def _times(entries: list[dict], key: str) -> list[tuple[str, float, float]]:
    return [(entry[key], entry["start"], entry["end"]) for entry in entries]


@pytest.mark.parametrize("kind", ["well-formed", "malformed"])
def test_frame_tokens_read_as_nemo_reads_them(pair: tuple[Any, Any], kind: str) -> None:
    nemo, model = pair
    subsampling = model.config.encoder.subsampling_factor
    sizes = [1000, 1000, 1000, 800]  # 10 s chunks of feature frames, then the rest
    if kind == "well-formed":
        chunks = _well_formed(nemo, [size // subsampling for size in sizes])
    else:
        chunks = _malformed(nemo)
    expected, ours = _nemo_join(nemo, chunks, sizes), _ours(model, chunks, sizes)
    assert ours.text == " ".join(expected.text.split())
    assert _as_nemo(ours.words) == _times(expected.timestamp["word"], "word")
    assert _as_nemo(ours.segments) == _times(expected.timestamp["segment"], "segment")
    if kind == "well-formed":
        assert len(ours.words) > 20 and len(ours.segments) >= 4
        for items in (ours.words, ours.segments):
            starts = [item.start for item in items]
            assert starts == sorted(starts) and all(0 <= i.start < i.end <= ours.seconds for i in items)


def test_timestamps_end_to_end_match_nemo(pair: tuple[Any, Any], tmp_path: Path) -> None:
    nemo, model = pair
    path = write(tmp_path / "long.wav", long_signal(25.0))
    slots = nemo_prompt_slots("canary2", "en", "en", True)
    frame_asr, expected = nemo_frame_batch(nemo, path, 10.0, slots, timestamps=True)
    result = model.transcribe(path, source_lang="en", strategy="greedy", timestamp=True)[0]
    assert [c.tokens for c in result.chunks] == [h.y_sequence.tolist() for h in frame_asr.all_preds]
    assert len(result.chunks) == 3 and result.timestamps
    assert result.text == " ".join(expected.text.split())
    assert _as_nemo(result.words) == _times(expected.timestamp["word"], "word")
    assert _as_nemo(result.segments) == _times(expected.timestamp["segment"], "segment")


def test_timestamps_of_a_clip_match_nemo_transcribe(pair: tuple[Any, Any]) -> None:
    nemo, model = pair
    signal = long_signal(6.0)
    nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": "greedy"}))
    slots = {k: v for k, v in nemo_prompt_slots("canary2", "en", "en", True).items() if k != "timestamp"}
    expected = nemo.transcribe([signal], batch_size=4, verbose=False, timestamps=True, **slots)[0]
    result = model.transcribe(signal, source_lang="en", strategy="greedy", timestamp=True)[0]
    assert result.tokens == expected.y_sequence.tolist() and result.text == expected.text
    assert _as_nemo(result.words) == _times(expected.timestamp["word"], "word")
