"""Long audio against NeMo's own long-form inference, and the flags that keep a cut transcript from passing
silently.

* Fixed chunks: NeMo's FrameBatchMultiTaskAED, as its speech_to_text_aed_chunked_infer.py script drives it
  (40 s chunks, 4 per batch), on every tiny variant and on the trained example model (2 s chunks, where its
  transcripts differ chunk by chunk).
* Overlapping chunks: NeMo's EncDecMultiTaskModel.transcribe on one long file of a checkpoint that carries a
  timestamps model (built here as canary-1b-v2 carries one: a tiny NeMo CTC model packed beside the Canary).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import TranscriptWarning, UsageError
from canary_convert.model.app.audio_io import open_audio
from canary_convert.model.app.chunking import frame_chunks
from canary_convert.model.aed.decoding import max_generation_length
from canary_convert.model.app.longform import frame_features
from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from canary_convert.parity import nemo_prompt_slots, reference_signals, restore_nemo
from conftest import REPO, convert_each
from factory import ALIGNER, VARIANTS, build_ctc, with_aligner
from long_inputs import build_long_audio, long_signal, nemo_frame_batch, write

EXAMPLE = REPO / "examples" / "tiny-canary"
CLI = str(Path(sys.executable).parent / "canary-transcribe")


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_each(checkpoints, tmp_path_factory.mktemp("longform"))


def _same_text(ours: str, nemo: str) -> bool:
    # NeMo joins chunk texts with a space (each starts with one); ours strips them first.
    return ours == " ".join(nemo.split())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fixed_chunks_match_nemo(checkpoints: dict[str, Path], converted: dict[str, Path], tmp_path: Path,
                                 variant: str) -> None:
    nemo, model = restore_nemo(checkpoints[variant]), load_model(converted[variant])
    path = write(tmp_path / "long.wav", long_signal(95.0))
    frame_asr, expected = nemo_frame_batch(nemo, path, 40.0, nemo_prompt_slots(model.config.prompt_format, "en", "en", True))
    result = model.transcribe(path, source_lang="en", strategy="greedy")[0]
    assert len(result.chunks) == len(frame_asr.all_preds) == 3
    assert [c.tokens for c in result.chunks] == [h.y_sequence.tolist() for h in frame_asr.all_preds]
    assert result.tokens == expected.y_sequence.tolist() and _same_text(result.text, expected.text)
    # Each chunk's features, read from just the samples it needs, are NeMo's (whole-file, then cut).
    with open_audio(path) as source:
        frames = int(model.preprocessor.output_lengths(mx.array([source.num_samples])).item())
        spans = frame_chunks(frames, 40.0, model.config.preprocessor.window_stride)
        for span, buffer in zip(spans, frame_asr.frame_buffers, strict=True):
            assert np.abs(frame_features(model, source, span) - buffer).max() < 1e-3
    assert [c.start for c in result.chunks] == [0.0, 40.0, 80.0] and result.chunks[-1].end == pytest.approx(95.0, abs=0.01)


def test_example_fixed_chunks_match_nemo(tmp_path: Path) -> None:
    """A trained model, whose transcript changes from chunk to chunk: greedy and batched beam-4 search."""
    nemo = restore_nemo(EXAMPLE / "tiny-canary.nemo")
    model = load_model(convert(str(EXAMPLE / "tiny-canary.nemo"), tmp_path / "mlx", ConvertOptions()).out)
    path = write(tmp_path / "long.wav", build_long_audio(EXAMPLE, "en", seconds=25.0, seed=3).samples)
    prompt = nemo_prompt_slots("canary", "en", "en", True)
    for strategy, beam_size in (("greedy", 1), ("beam", 4)):
        frame_asr, expected = nemo_frame_batch(nemo, path, 2.0, prompt, strategy, beam_size)
        result = model.transcribe(path, source_lang="en", strategy=strategy, beam_size=beam_size, chunk_seconds=2.0)[0]
        assert [c.tokens for c in result.chunks] == [h.y_sequence.tolist() for h in frame_asr.all_preds]
        assert _same_text(result.text, expected.text)
        assert len({tuple(c.tokens) for c in result.chunks}) > len(result.chunks) // 2  # the chunks differ


@pytest.fixture(scope="module")
def with_ts(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("timestamps-model")
    aligner = build_ctc(ALIGNER, folder / "aligner.nemo")
    nemo_file = with_aligner(checkpoints["canary2-bpe-sub16"], aligner, folder / "canary-ts.nemo")
    return nemo_file, convert(str(nemo_file), folder / "mlx", ConvertOptions()).out


def test_overlapping_chunks_match_nemo(with_ts: tuple[Path, Path], tmp_path: Path) -> None:
    nemo_file, folder = with_ts
    nemo, model = restore_nemo(nemo_file), load_model(folder)
    assert nemo.timestamps_asr_model is not None and model.config.timestamps_asr_model
    path = write(tmp_path / "long.wav", long_signal(100.0))
    nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": "greedy"}))
    expected = nemo.transcribe(str(path), batch_size=4, verbose=False, **nemo_prompt_slots("canary2", "en", "en", True))[0]
    result = model.transcribe(path, source_lang="en", strategy="greedy")[0]
    # NeMo's y_sequence is every chunk's tokens end to end; its text is that of the merged tokens.
    assert [t for c in result.chunks for t in c.tokens] == expected.y_sequence.tolist()
    assert result.text == expected.text
    # 100 s: 35 s chunks (the size in 30..40 s that leaves the longest last chunk), 1 s overlap.
    assert [(c.start, c.end) for c in result.chunks] == [(0.0, 35.0), (34.0, 69.0), (68.0, 100.0)]


def test_timestamps_of_a_folder_without_its_aligner_are_refused(with_ts: tuple[Path, Path], tmp_path: Path) -> None:
    # A canary-1b-v2 folder converted before the aligner was (no aligner/): timestamps need a new conversion.
    _, converted = with_ts
    folder = tmp_path / "old"
    shutil.copytree(converted, folder)
    shutil.rmtree(folder / "aligner")
    with pytest.raises(UsageError, match="convert it again"):
        load_model(folder).transcribe(long_signal(3.0), source_lang="en", timestamp=True)
    wav = write(tmp_path / "a.wav", long_signal(3.0))
    result = subprocess.run([CLI, str(wav), "--model", str(folder), "--timestamps"], capture_output=True, text=True)
    assert result.returncode == 2 and "convert it again" in " ".join(result.stderr.split())


def test_over_long_input_without_chunking_is_flagged(checkpoints: dict[str, Path], converted: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """60 s in one piece: longer than the window, and (as NeMo's own output shows) cut by the length budget."""
    variant = "canary-sub8"
    signal = long_signal(60.0)
    nemo = restore_nemo(checkpoints[variant])
    nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": "greedy"}))
    reference = nemo.transcribe([signal], batch_size=4, verbose=False, **nemo_prompt_slots("canary", "en", "en", True))[0]
    model = load_model(converted[variant])
    prompt = build_prompt("canary", model.tokenizer, PromptOptions("en"))
    frames = int(model.encode(*model.preprocess(signal))[1].item())
    budget = max_generation_length(model.config.decoder.max_sequence_length, frames, len(prompt),
                                   model.config.decoding.greedy_max_generation_delta)
    assert len(reference.y_sequence) == budget  # NeMo ran out of budget before end-of-text

    result = subprocess.run([CLI, str(write(tmp_path / "long.wav", signal)), "--model", str(converted[variant]),
                             "--greedy", "--chunking", "off", "--format", "json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)[0]
    assert record["over_window"] and record["truncated"] and record["tokens"] == reference.y_sequence.tolist()
    stderr = " ".join(result.stderr.split())
    assert "longer than the 40 s window and chunking is off" in stderr and "reached the length budget" in stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transcript = model.transcribe(signal, source_lang="en", strategy="greedy", chunking="off")[0]
    assert transcript.over_window and transcript.truncated
    assert [str(w.message) for w in caught if w.category is TranscriptWarning] == list(transcript.warnings)


def test_generated_ids_past_the_tokenizer_are_kept_out_of_the_text(converted: dict[str, Path]) -> None:
    model = load_model(converted["canary-sub8"])
    padded = model.config.decoder.vocab_size - 1
    assert padded >= model.tokenizer.vocab_size  # the decoder's rows are padded to a multiple of 8
    # Make one padded row win at every step: a random or badly trained model can emit such ids.
    model.decoder.output_bias = mx.where(mx.arange(padded + 1) == padded, 100.0, model.decoder.output_bias)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.transcribe(long_signal(2.0), source_lang="en", strategy="greedy")[0]
    assert set(result.tokens) == {padded} and result.text == ""
    found = [str(w.message) for w in caught if "past the tokenizer" in str(w.message)]
    assert len(found) == 1 and str(padded) in found[0]


def test_preprocess_takes_what_transcribe_takes(converted: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(converted["canary2-proj-sub4"])
    clips = reference_signals(16000)
    batch = np.zeros((len(clips), max(c.size for c in clips)), dtype=np.float32)
    for row, clip in enumerate(clips):
        batch[row, : clip.size] = clip
    expected, frames = model.preprocess(mx.array(batch), mx.array([c.size for c in clips]))
    paths = [write(tmp_path / f"{i}.wav", clip) for i, clip in enumerate(clips)]
    for audio in (paths, [str(p) for p in paths], clips, [paths[0], clips[1], str(paths[2])]):
        features, counts = model.preprocess(audio)
        assert counts.tolist() == frames.tolist() and mx.array_equal(features, expected).item()
    one, count = model.preprocess(paths[1])
    assert count.tolist() == [frames[1].item()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chunking", "sometimes"], "chunking 'sometimes': choose one of nemo, pauses, off"),
        (["--chunk-seconds", "0"], "chunk_seconds must be positive"),
        (["--format", "doc"], "--format 'doc': choose one of txt, json, srt, vtt"),
        (["--format", "srt", "{wav}"], "--format srt with several inputs needs --output-dir"),
    ],
)
def test_long_form_usage_errors(converted: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    wav = write(tmp_path / "a.wav", long_signal(2.0))
    command = [CLI, str(wav), "--model", str(converted["canary-sub8"]), *[a.format(wav=wav) for a in args]]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and message in " ".join(result.stderr.split())


def test_audio_is_resampled_block_by_block(tmp_path: Path) -> None:
    """A long 44.1 kHz stereo file is converted a block at a time, giving soxr's one-shot result exactly."""
    import soxr

    from canary_convert.model.app.audio_io import CONVERT_BLOCK

    stereo = np.random.default_rng(0).standard_normal((int(50 * 44100), 2)).astype(np.float32) * 0.1
    assert stereo.shape[0] > 2 * CONVERT_BLOCK
    path = tmp_path / "stereo.flac"
    soundfile.write(path, stereo, 44100, subtype="PCM_24")
    mono = soundfile.read(path, dtype="float32")[0].mean(axis=1, dtype=np.float32)
    expected = soxr.resample(mono, 44100, 16000, quality="HQ")
    with open_audio(path) as source:
        assert source.num_samples == expected.size and source.sample_rate == 16000
        assert np.array_equal(source.read(123_456, 345_678), expected[123_456:345_678])
        assert np.array_equal(source.read(-5, source.num_samples + 5), expected)


def test_subtitles_from_segments_or_chunks() -> None:
    from canary_convert.formats import to_srt, to_vtt
    from canary_convert.model.aed.timestamps import TimedText
    from canary_convert.model.app.transcribe import Chunk, Transcript

    chunks = (Chunk(0.0, 40.0, "First part.", [1], True), Chunk(40.0, 3725.5, "", [], True),
              Chunk(3725.5, 3726.25, "Last.", [2], False))
    plain = Transcript("a.wav", "First part. Last.", [1, 2], 3726.25, chunks)
    assert to_srt(plain) == ("1\n00:00:00,000 --> 00:00:40,000\nFirst part.\n\n"
                             "2\n01:02:05,500 --> 01:02:06,250\nLast.\n")
    timed = Transcript("a.wav", "Hi there.", [1], 2.0, chunks[:1], segments=(TimedText("Hi there.", 0.08, 1.2),),
                       timestamps=True)
    assert to_vtt(timed) == "WEBVTT\n\n00:00:00.080 --> 00:00:01.200\nHi there.\n"
