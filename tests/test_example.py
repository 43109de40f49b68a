"""The trained example model: NeMo and the MLX conversion agree on every committed clip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import TranscriptWarning
from canary_convert.model.app.longform import ChunkOutput, LongFormOutput
from canary_convert.model.app.transcribe import SPARSE_MIN_SPEECH_SECONDS, SPARSE_TOKENS_PER_SECOND, sparse_chunks
from canary_convert.model.speech import Decoded
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.model.app.audio_io import load_audio
from canary_convert.parity import compare_tokens, restore_nemo
from conftest import REPO, run_cli

from long_inputs import build_long_audio
from wer import word_error_rate  # examples/wer.py, on the path through long_inputs

EXAMPLE = REPO / "examples" / "tiny-canary"
RECORDS = json.loads((EXAMPLE / "references.json").read_text())
LANGS = sorted({record["lang"] for record in RECORDS})


PRECISIONS = {"float32": ConvertOptions(), "float16": ConvertOptions(dtype="float16"),
              "8bit": ConvertOptions(quantize=QuantizeOptions.create(8))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("example")
    return {name: convert(str(EXAMPLE / "tiny-canary.nemo"), folder / name, options).out
            for name, options in PRECISIONS.items()}


@pytest.fixture(scope="module")
def nemo() -> object:
    return restore_nemo(EXAMPLE / "tiny-canary.nemo")


def _clips(lang: str) -> list[dict]:
    return [record for record in RECORDS if record["lang"] == lang]


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("pnc", [True, False])
def test_committed_nemo_transcripts(converted: dict[str, Path], lang: str, pnc: bool) -> None:
    # NeMo's transcripts were written by the training script; this needs no NeMo at run time.
    records = _clips(lang)
    results = load_model(converted["float32"]).transcribe([str(EXAMPLE / r["audio"]) for r in records],
                                                          source_lang=lang, pnc=pnc)
    key = "nemo_pnc" if pnc else "nemo_nopnc"
    assert [r.text.strip() for r in results] == [record[key].strip() for record in records]


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("pnc", [True, False])
def test_nemo_and_mlx_tokens_agree(nemo: object, converted: dict[str, Path], precision: str, lang: str,
                                   pnc: bool) -> None:
    audio = [load_audio(EXAMPLE / record["audio"]) for record in _clips(lang)]
    assert compare_tokens(nemo, load_model(converted[precision]), audio, lang, lang, pnc) == \
        {"greedy": True, "beam4": True}


def test_the_model_listens_and_honours_pnc() -> None:
    # Different clips get different transcripts, and pnc on/off changes the text as the labels do.
    assert len({record["nemo_nopnc"] for record in RECORDS}) > len(RECORDS) // 2
    assert any(record["nemo_pnc"] != record["nemo_nopnc"] for record in RECORDS)


def test_a_fresh_conversion_matches_the_committed_goldens(converted: dict[str, Path], tmp_path: Path) -> None:
    # examples/tiny-canary/goldens.json was recorded once (with --parity, so NeMo's outputs are its reference); a
    # change to the bundled model's numerics, to MLX or to the converter fails here with the stage named.
    report = tmp_path / "report.json"
    result = run_cli("verify", str(converted["float32"]), "--goldens", str(EXAMPLE / "goldens.json"),
                     "--json", str(report))
    checks = json.loads(report.read_text())["checks"]
    assert result.returncode == 0, [c for c in checks if c["status"] != "pass"]
    assert {"test-signals: NeMo reference, encoder", "test-signals: NeMo reference, greedy tokens",
            "test-signals: translate en->de beam4 tokens"} <= {c["name"] for c in checks}


@pytest.mark.parametrize("lang", LANGS)
def test_long_recording(converted: dict[str, Path], tmp_path: Path, lang: str) -> None:
    """Three minutes of the committed clips joined with pauses: every utterance, in order, and the WER of
    the clips transcribed one by one (within 2 points)."""
    audio = build_long_audio(EXAMPLE, lang)
    assert audio.seconds >= 180
    model = load_model(converted["float32"])
    alone = {record["audio"]: result.text.strip() for record, result in
             zip(_clips(lang), model.transcribe([str(EXAMPLE / r["audio"]) for r in _clips(lang)], source_lang=lang))}
    path = tmp_path / "long.wav"
    soundfile.write(path, audio.samples, 16000, subtype="FLOAT")
    cli = [str(Path(sys.executable).parent / "canary-transcribe"), str(path), "--model", str(converted["float32"]),
           "--source-lang", lang, "--chunking", "pauses", "--chunk-seconds", "2"]  # one utterance under 2 s at a time
    done = subprocess.run([*cli, "--format", "json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)[0]
    reference = " ".join(record["pnc"] for record in audio.records)
    clip_by_clip = " ".join(alone[record["audio"]] for record in audio.records)
    assert abs(word_error_rate([reference], [result["text"]]) - word_error_rate([reference], [clip_by_clip])) <= 0.02
    # One chunk per utterance, each over its utterance, in order, none empty.
    assert len(result["chunks"]) == len(audio.spans)
    for chunk, (start, end) in zip(result["chunks"], audio.spans):
        assert chunk["start"] < end and chunk["end"] > start and chunk["text"]
    assert not result["truncated"] and not result["warnings"]
    # Subtitles: one cue per utterance, in time order.
    srt = subprocess.run([*cli, "--format", "srt"], capture_output=True, text=True, check=True).stdout
    times = re.findall(r"^(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})$", srt, flags=re.M)
    assert len(times) == len(audio.spans) and times == sorted(times)


def test_a_long_recording_on_chunks_the_model_cannot_read_warns(converted: dict[str, Path], tmp_path: Path) -> None:
    """NeMo's 40 s chunks are too long for a model trained on 2 s utterances: a dozen words for three minutes.
    The transcript must say so (stderr, JSON, TranscriptWarning) and name the way out."""
    audio = build_long_audio(EXAMPLE, "en")
    path = tmp_path / "long.wav"
    soundfile.write(path, audio.samples, 16000, subtype="FLOAT")
    cli = [str(Path(sys.executable).parent / "canary-transcribe"), str(path), "--model", str(converted["float32"]),
           "--source-lang", "en", "--format", "json"]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)[0]
    assert len(result["text"].split()) < 40 and len(result["chunks"]) == 5  # 40 s chunks: the silent loss
    assert result["sparse_chunks"] == [0, 1, 2, 3, 4]
    [warning] = result["warnings"]
    assert "5 of 5 chunks have far fewer words than speech" in warning and "try --chunking pauses" in warning
    assert f"warning: {warning}" in " ".join(done.stderr.split())
    with pytest.warns(TranscriptWarning, match="far fewer words than speech"):
        load_model(converted["float32"]).transcribe(audio.samples, source_lang="en")


def test_the_sparse_chunk_threshold(converted: dict[str, Path]) -> None:
    """Fewer than SPARSE_TOKENS_PER_SECOND text tokens per second of speech, with SPARSE_MIN_SPEECH_SECONDS of
    speech or more, and only then; prompt tokens do not count as text."""
    tokenizer = load_model(converted["float32"]).tokenizer
    word = tokenizer.encode("one", "en")[0]
    special = next(iter(tokenizer.special_tokens.values()))

    def chunk(tokens: list[int]) -> ChunkOutput:
        return ChunkOutput(0.0, 40.0, Decoded(tokens=tokens, ended=True))

    output = LongFormOutput("frames", [chunk([word] * 9), chunk([word] * 10), chunk([]), chunk([word] * 9 + [special] * 5)],
                            [[0, 1, 2, 3]], speech=[10.0, 10.0, SPARSE_MIN_SPEECH_SECONDS - 0.1, 10.0])
    assert SPARSE_TOKENS_PER_SECOND == 1.0 and sparse_chunks(tokenizer, output) == (0, 3)
