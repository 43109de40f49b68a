"""canary-1b-v2's timestamp aligner: converted from the archive beside the Canary, and NeMo's forced alignment
reproduced: Canary tokens, aligner log-probs, word and segment offsets and seconds, against NeMo's own."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert, plan_only
from canary_convert.model.aed.canary import CanaryModel
from canary_convert.model.app.clips import pad_batch, pad_short
from canary_convert.model.ctc.model import CTCModel
from canary_convert.parity import nemo_prompt_slots, reference_signals
from canary_convert.verify import verify_folder
from conftest import run_cli
from factory import ALIGNER, CHATTY, SHARED_ALIGNER, VARIANTS, build, build_ctc, canary_tokenizer, with_aligner
from long_inputs import long_signal, write

# Clips of several lengths (the two under a second are padded by NeMo, as by us).
SIGNALS = reference_signals(16000) + reference_signals(16000, (0.6, 5.2, 0.45))
# Texts with NeMo's segment and punctuation rules at work, the unknown mark, nothing, and too many tokens.
TEXTS = ["Hello, world. This is a test!", "Is the cat on the mat? Yes.", "one, two, three. four five six!",
         "", "hello w\u00f6rld \u2047 test", "the cat sat on the mat " * 12]


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nemo-v2")
    canary = build(VARIANTS["canary2-bpe-sub16"], folder / "canary.nemo")
    aligner = build_ctc(ALIGNER, folder / "aligner.nemo")
    return with_aligner(canary, aligner, folder / "v2.nemo")


@pytest.fixture(scope="module")
def nemo(v2: Path) -> Any:
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(nemo_logging.ERROR)
    model = EncDecMultiTaskModel.restore_from(str(v2), map_location="cpu").eval()
    assert model.timestamps_asr_model is not None  # NeMo restored the packed aligner
    return model


@pytest.fixture(scope="module")
def converted(v2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(str(v2), tmp_path_factory.mktemp("mlx-v2") / "v2", ConvertOptions()).out


def _slots() -> dict[str, str]:
    slots = nemo_prompt_slots("canary2", "en", "en", True)
    slots.pop("timestamp")
    return slots


def _offsets(items: list[dict[str, Any]], key: str) -> list[tuple[str, int, int, float, float]]:
    return [(item[key], int(item["start_offset"]), int(item["end_offset"]), float(item["start"]), float(item["end"]))
            for item in items]


def _ours(items: list[Any]) -> list[tuple[str, int, int, float, float]]:
    return [(item.text, item.start, item.end, item.start_seconds, item.end_seconds) for item in items]


def test_the_folder_holds_the_aligner(v2: Path, converted: Path) -> None:
    config = json.loads((converted / "aligner" / "config.json").read_text())
    assert config["model_type"] == "ctc" and config["family"] == "ctc-bpe"
    assert config["encoder"]["feat_in"] == ALIGNER.features and config["ctc"]["num_classes"] > ALIGNER.vocab // 2
    record = json.loads((converted / "conversion.json").read_text())
    assert record["aligner"]["folder"] == "aligner" and record["aligner"]["validation"]["round_trip"] == "exact"
    assert {"aligner/config.json", "aligner/model.safetensors", "aligner/tokenizer/tokenizer.model"} <= set(record["manifest"])
    assert not any("timestamps_asr_model" in member or "tokenizer" in member for member in record["ignored_members"])
    # The aligner's tokenizer is its own, not the Canary's.
    with tarfile.open(v2) as tar:
        aligner_config = tar.extractfile("./timestamps_asr_model_config.yaml").read().decode()
    ours = (converted / "aligner" / "tokenizer" / "tokenizer.model").read_bytes()
    assert ours != (converted / "tokenizer" / "tokenizer.model").read_bytes() and "tokenizer.model" in aligner_config
    model = load_model(converted)
    assert isinstance(model, CanaryModel) and isinstance(model.aligner.model, CTCModel)
    goldens = json.loads((converted / "goldens.json").read_text())
    assert goldens["parts"]["aligner"]["groups"]["test-signals"]["stages"]["logprobs"]
    card = (converted / "README.md").read_text()
    assert "forced alignment with the CTC model in `aligner/`" in card
    report = verify_folder(converted, str(converted), "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]
    assert {"aligner: test-signals: logprobs", "aligner: test-signals: greedy tokens"} <= {c.name for c in report.checks}


def test_dry_run_shows_both_plans(v2: Path, tmp_path: Path) -> None:
    conversion = plan_only(str(v2), ConvertOptions())
    assert conversion.aligner is not None
    assert {plan.target_key for plan in conversion.aligner.plan.tensors} >= {"decoder.classifier.weight"}
    done = run_cli(str(v2), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "ctc-bpe" in done.stdout and "canary-1b-v2" in done.stdout
    assert "decoder.classifier.weight" in done.stdout and "decoder.token_embedding.weight" in done.stdout


def test_aligner_logprobs_match_nemo(nemo: Any, converted: Path) -> None:
    aligner = load_model(converted).aligner
    clips = [pad_short(signal, 16000) for signal in SIGNALS]
    hypotheses = nemo.timestamps_asr_model.transcribe(clips, batch_size=len(clips), return_hypotheses=True, verbose=False)
    batch, lengths = pad_batch(clips)
    logprobs, frames = aligner.logprobs(mx.array(batch), mx.array(lengths))
    for row, hypothesis in enumerate(hypotheses):
        reference = hypothesis.y_sequence.numpy()
        assert frames[row] == reference.shape[0]
        assert float(np.abs(logprobs[row, : frames[row]] - reference).max()) <= 1e-4


def test_alignment_of_given_texts_matches_nemo(nemo: Any, converted: Path) -> None:
    import torch
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
    from nemo.collections.asr.parts.utils.timestamp_utils import get_forced_aligned_timestamps_with_external_model

    aligner = load_model(converted).aligner
    # Clips long enough for the first three texts and the unknown mark; the long text gets too few frames.
    clips = [pad_short(signal, 16000) for signal in reference_signals(16000, (5.2, 3.4, 4.1, 0.6, 3.4, 1.1))]
    references = get_forced_aligned_timestamps_with_external_model(
        audio=[torch.from_numpy(clip) for clip in clips], batch_size=len(clips),
        external_ctc_model=nemo.timestamps_asr_model,
        main_model_predictions=[Hypothesis(score=0.0, y_sequence=[], text=text) for text in TEXTS],
        timestamp_type=["word", "segment"], verbose=False)
    batch, lengths = pad_batch(clips)
    ours = aligner.align(mx.array(batch), mx.array(lengths), TEXTS)
    aligned = 0
    for reference, (words, segments), text in zip(references, ours, TEXTS):
        assert _ours(words) == _offsets(reference.timestamp["word"], "word"), text
        assert _ours(segments) == _offsets(reference.timestamp["segment"], "segment"), text
        aligned += bool(words)
    # Every case is there: aligned texts, punctuation snapped, and NeMo's refusals (no text, too many tokens).
    assert aligned == 4 and not ours[3][0] and not ours[5][0]
    # Punctuation is a token of its own, so NeMo's snapping of its end is at work.
    assert aligner.model.tokenizer.encode_pieces("Hello,")[-1] == ","


def test_transcribe_with_timestamps_matches_nemo(nemo: Any, converted: Path) -> None:
    model = load_model(converted)
    hypotheses = nemo.transcribe(SIGNALS, batch_size=4, timestamps=True, return_hypotheses=True, verbose=False,
                                 **_slots())
    results = model.transcribe(SIGNALS, source_lang="en", target_lang="en", pnc=True, timestamp=True)
    aligned = 0
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.tokens == hypothesis.y_sequence.tolist()
        assert result.text == hypothesis.text
        reference_words = hypothesis.timestamp.get("word", [])
        if any(word["start"] == -1 for word in reference_words):
            # No CTC path fits (README: where NeMo reports its padding's path, start -1): no times.
            assert result.words == () and result.segments == ()
            continue
        aligned += bool(reference_words)
        assert [(w.text, w.start, w.end) for w in result.words] == \
            [(w["word"], w["start"], w["end"]) for w in reference_words]
        assert [(s.text, s.start, s.end) for s in result.segments] == \
            [(s["segment"], s["start"], s["end"]) for s in hypothesis.timestamp.get("segment", [])]
    # Offsets, in frames of the aligner, as NeMo reports them: decode NeMo's first batch as it does.
    assert aligned >= 2  # real alignments among them, not only refusals
    decode = model.batch_decoder(model.prompt_options("en", "en", pnc=True, timestamp=True), model.decoding_options())
    from canary_convert.model.speech import AudioBatch

    clips = [pad_short(signal, 16000) for signal in SIGNALS[:4]]
    batch, lengths = pad_batch(clips)
    samples, counts = mx.array(batch), mx.array(lengths)
    decoded = decode(AudioBatch(*model.preprocess(samples, counts), samples, counts))
    for hypothesis, result in zip(hypotheses[:4], decoded):
        reference = hypothesis.timestamp.get("word", [])
        if not any(word["start"] == -1 for word in reference):
            assert _ours(result.words) == _offsets(reference, "word")


def test_long_audio_with_timestamps_by_pauses(converted: Path) -> None:
    model = load_model(converted)
    rate = 16000
    speech = reference_signals(rate, (6.0,))[0]
    silence = np.zeros(2 * rate, dtype=np.float32)
    # 7 x (6 s of signal + 2 s of silence) = 56 s: over NeMo's 40 s window.
    long = np.concatenate([np.concatenate([speech, silence])] * 7)
    [result] = model.transcribe(long, source_lang="en", target_lang="en", timestamp=True, chunking="pauses")
    assert len(result.chunks) > 1 and result.words
    # Each chunk's words are its own alignment, placed at the chunk's start: the same as aligning it alone.
    for chunk in result.chunks:
        clip = long[round(chunk.start * rate): round(chunk.end * rate)]
        [alone] = model.transcribe(clip, source_lang="en", target_lang="en", timestamp=True)
        inside = [(w.text, round(w.start - chunk.start, 6), round(w.end - chunk.start, 6)) for w in result.words
                  if chunk.start <= w.start < chunk.end]
        assert inside == [(w.text, round(w.start, 6), round(w.end, 6)) for w in alone.words]
    assert all(a.start <= b.start for a, b in zip(result.words, result.words[1:]))


def test_cli_timestamps_json_srt_vtt(converted: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import soundfile

    clip = tmp_path / "clip.wav"
    soundfile.write(clip, SIGNALS[4], 16000, subtype="FLOAT")
    tool = str(Path(sys.executable).parent / "canary-transcribe")
    [expected] = load_model(converted).transcribe(SIGNALS[4], source_lang="en", target_lang="en", timestamp=True)
    assert expected.words
    outputs = {}
    for fmt in ("json", "srt", "vtt"):
        done = subprocess.run([tool, str(clip), "--model", str(converted), "--source-lang", "en", "--timestamps",
                               "--format", fmt], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[fmt] = done.stdout
    record = json.loads(outputs["json"])[0]
    assert [(w["word"], w["start"], w["end"]) for w in record["words"]] == \
        [(w.text, w.start, w.end) for w in expected.words]
    assert "-->" in outputs["srt"] and outputs["vtt"].startswith("WEBVTT")


def test_mlx_audio_layout_keeps_working(v2: Path, tmp_path: Path) -> None:
    from mlx_audio.stt import load as mlx_audio_load

    folder = convert(str(v2), tmp_path / "mlx-audio", ConvertOptions(layout="mlx-audio")).out
    mlx_audio_load(str(folder), strict=True)  # the Canary half, in mlx-audio's names
    ours = load_model(folder)
    assert ours.aligner is not None and (folder / "aligner" / "config.json").is_file()
    assert "mlx-audio ignores `aligner/`" in (folder / "README.md").read_text()
    report = verify_folder(folder, "mlx-audio", "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]


def test_verify_update_reports_the_aligner(converted: Path, tmp_path: Path) -> None:
    import shutil

    from canary_convert.verify import golden_changes, update_goldens

    folder = tmp_path / "v2"
    shutil.copytree(converted, folder)
    assert update_goldens(folder, "cpu") == ["nothing changed"]
    goldens = json.loads((folder / "goldens.json").read_text())
    edited = json.loads(json.dumps(goldens))
    edited["parts"]["aligner"]["groups"]["test-signals"]["decoding"][0]["tokens"][0].append(1)
    assert golden_changes(edited, goldens) == ["aligner: test-signals: greedy tokens changed"]
    assert verify_folder(folder, "v2", "cpu").exit_code == 0  # re-recorded goldens still verify, aligner included


# Over NeMo's 40 s window: NeMo's parallel chunks of canary-1b-v2 (0-39 s and 38-75 s, one second of overlap).
CHUNKED_SECONDS = 75.0


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any, Any, Any]]:
    """A 75 s file through NeMo's transcribe (enable_chunking, batch size 1), with and without timestamps,
    and through ours with timestamps, for two aligners of one Canary: one sharing its tokenizer and frame
    length (as the release's does), and one with a tokenizer and subsampling of its own."""
    from omegaconf import OmegaConf

    from conftest import restore_nemo_models

    folder = tmp_path_factory.mktemp("chunked-v2")
    canary = build(CHATTY, folder / "canary.nemo")
    audio = write(folder / "long.wav", long_signal(CHUNKED_SECONDS))
    runs = {}
    for name, spec, tokenizer in (("shared", SHARED_ALIGNER, canary_tokenizer(canary, folder / "tokenizer")),
                                  ("own", ALIGNER, None)):
        aligner = build_ctc(spec, folder / f"aligner-{name}.nemo", tokenizer)
        source = with_aligner(canary, aligner, folder / f"{name}.nemo")
        nemo = restore_nemo_models({name: source})[name]
        nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": "greedy"}))
        timed = nemo.transcribe(str(audio), batch_size=1, timestamps=True, return_hypotheses=True, verbose=False,
                                **_slots())[0]
        plain = nemo.transcribe(str(audio), batch_size=1, return_hypotheses=True, verbose=False, **_slots())[0]
        model = load_model(convert(str(source), folder / f"mlx-{name}", ConvertOptions()).out)
        [ours] = model.transcribe(audio, source_lang="en", target_lang="en", strategy="greedy", timestamp=True)
        runs[name] = (timed, plain, ours, model)
    return runs


def _nemo_items(items: list[dict[str, Any]], key: str) -> list[tuple[str, float, float]]:
    return [(item[key], item["start"], item["end"]) for item in items]


def _our_items(items: tuple[Any, ...]) -> list[tuple[str, float, float]]:
    return [(item.text, item.start, item.end) for item in items]


def test_chunked_timestamps_match_nemo_where_the_tokenizers_agree(chunked: dict[str, tuple[Any, Any, Any, Any]]) -> None:
    nemo, _, ours, _ = chunked["shared"]
    assert [(chunk.start, chunk.end) for chunk in ours.chunks] == [(0.0, 39.0), (38.0, CHUNKED_SECONDS)]
    assert [token for chunk in ours.chunks for token in chunk.tokens] == nemo.y_sequence.tolist()
    # NeMo's text with timestamps is its merge of the aligner's tokens; ours the same, and every word and
    # segment with the same seconds, to the last bit of NeMo's unrounded offset x stride x subsampling.
    assert ours.text == nemo.text
    assert _our_items(ours.words) == _nemo_items(nemo.timestamp["word"], "word")
    assert _our_items(ours.segments) == _nemo_items(nemo.timestamp["segment"], "segment")
    # Real content on both sides of the overlap: many words, segments ended by `.` or `!`, prompt tokens.
    assert len(ours.words) >= 50 and len(ours.segments) >= 5
    assert any(word.start > 39.0 for word in ours.words) and any(word.text.endswith(".") for word in ours.words)


def test_chunked_timestamps_where_the_tokenizers_differ(chunked: dict[str, tuple[Any, Any, Any, Any]]) -> None:
    """NeMo merges the aligner's ids but decodes them with the Canary's tokenizer, and counts the aligner's
    frames in the Canary's frame length; we use the aligner's own (README, "Timestamps of canary-1b-v2")."""
    nemo, plain, ours, model = chunked["own"]
    aligner = model.aligner.tokenizer
    # NeMo's text is the Canary's reading of the aligner's ids: not its own transcript, nor the aligner's reading.
    assert nemo.text != plain.text and ours.text != nemo.text
    # Ours is the transcript as the aligner's tokenizer reads it, word for word (its unknown mark where it lacks
    # a piece; the spaces around it as its pieces decode).
    assert ours.text.split() == aligner.decode(aligner.encode_text(plain.text)).split()
    # The words are the aligner's pieces on both sides; NeMo's seconds count the aligner's 40 ms frames as the
    # Canary's 80 ms ones: twice ours in the first chunk.
    assert [word["word"] for word in nemo.timestamp["word"]] == [word.text for word in ours.words]
    first = [word for word in ours.words if word.end < 38.0]
    assert len(first) >= 10
    assert _nemo_items(nemo.timestamp["word"], "word")[: len(first)] == \
        [(word.text, 2 * word.start, 2 * word.end) for word in first]
