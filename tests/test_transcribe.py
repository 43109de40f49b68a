"""transcribe() and canary-transcribe against NeMo's own transcribe(), token for token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import ValidationError
from canary_convert.model.load import weight_files
from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from canary_convert.model.app.clips import pad_short
from canary_convert.parity import (
    ParityError,
    compare_tokens,
    nemo_encode,
    nemo_features,
    nemo_logprobs,
    nemo_prompt_slots,
    nemo_transcribe_tokens,
    reference_signals,
    restore_nemo,
    run_parity,
)
from conftest import run_cli
from factory import VARIANTS

# The reference signals plus two clips under a second (NeMo pads those with silence on both sides).
SIGNALS = reference_signals(16000) + reference_signals(16000, (0.6, 0.45))


@pytest.fixture(scope="module")
def nemo_models(checkpoints: dict[str, Path]) -> dict[str, object]:
    return {name: restore_nemo(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("mlx")
    return {
        (name, dtype): convert(str(path), folder / f"{name}-{dtype}", ConvertOptions(dtype=dtype)).out
        for name, path in checkpoints.items()
        for dtype in ("float32", "float16", "bfloat16")
    }


# Half precision moves log-probs by up to a few 1e-2; a random tiny decoder sometimes has two tokens
# closer than that, where any rounding may pick either. Such steps are NeMo's own near-ties. (Beam search
# re-ranks on such near-ties too; its half-precision identity waits for the trained example model.)
NEAR_TIE = {"float16": 0.05, "bfloat16": 0.25}  # bfloat16 keeps 8 bits: log-probs move by up to ~0.1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("source", "target", "pnc"), [("en", "en", True), ("de", "en", False)])
def test_float32_tokens_match_nemo_transcribe(nemo_models: dict, converted: dict, variant: str,
                                              source: str, target: str, pnc: bool) -> None:
    model = load_model(converted[variant, "float32"])
    agreement = compare_tokens(nemo_models[variant], model, SIGNALS, source, target, pnc)
    assert agreement == {"greedy": True, "beam4": True}


def _near_tie_steps(nemo: object, signal: np.ndarray, prompt: list[int], tokens: list[int], margin: float) -> list[int]:
    """Steps of NeMo's own greedy path where its best two tokens are closer than `margin`."""
    features, frames = nemo_features(nemo, [pad_short(signal, 16000)])
    encoded, lengths = nemo_encode(nemo, features, frames)
    logprobs = nemo_logprobs(nemo, np.array([prompt + tokens]), encoded, lengths)[0, len(prompt) - 1 :]
    top2 = np.sort(logprobs, axis=-1)[:, -2:]
    return [step for step, gap in enumerate(top2[:, 1] - top2[:, 0]) if step < len(tokens) and gap < margin]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tokens_match_nemo(nemo_models: dict, converted: dict, variant: str, dtype: str) -> None:
    nemo, model = nemo_models[variant], load_model(converted[variant, dtype])
    slots = nemo_prompt_slots(model.config.prompt_format, "en", "en", True)
    reference = nemo_transcribe_tokens(nemo, SIGNALS, "greedy", 1, slots)
    ours = [r.tokens for r in model.transcribe(SIGNALS, source_lang="en", strategy="greedy")]
    prompt = build_prompt(model.config.prompt_format, model.tokenizer, PromptOptions("en"))
    compared = 0
    for signal, mine, theirs in zip(SIGNALS, ours, reference):
        # Identical up to NeMo's first near-tie (all the way when it has none).
        ties = _near_tie_steps(nemo, signal, prompt, theirs, NEAR_TIE[dtype])
        end = ties[0] if ties else len(theirs) + 1
        assert mine[:end] == theirs[:end], (ties, len(theirs))
        compared += min(end, len(theirs))
    assert compared >= 20  # a real stretch of tokens is compared, not skipped


def test_transcript_text_and_tokens_of_a_file(checkpoints: dict[str, Path], converted: dict, tmp_path: Path) -> None:
    # A fresh NeMo model: transcribe() on files keeps prompt state from earlier calls with other options.
    nemo = restore_nemo(checkpoints["canary-sub8"])
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, SIGNALS[0], 16000)
    nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": "beam", "beam": {"beam_size": 1}}))
    expected = nemo.transcribe([str(wav)], batch_size=4, verbose=False, source_lang="en", target_lang="en", pnc="yes")[0]
    ours = load_model(converted["canary-sub8", "float32"]).transcribe(str(wav), source_lang="en", beam_size=1)
    assert [t.tokens for t in ours] == [expected.y_sequence.tolist()]
    assert ours[0].text == expected.text and ours[0].source == str(wav)


def test_cli_prints_text_and_json(nemo_models: dict, converted: dict, tmp_path: Path) -> None:
    folder = converted["canary2-proj-sub4", "float32"]
    nemo = nemo_models["canary2-proj-sub4"]
    paths = []
    for index, signal in enumerate(SIGNALS[:2]):
        paths.append(tmp_path / f"clip{index}.wav")
        soundfile.write(paths[-1], signal, 16000)
    slots = nemo_prompt_slots("canary2", "de", "de", False)
    expected = nemo_transcribe_tokens(nemo, SIGNALS[:2], "greedy", 1, slots)
    texts = [nemo.tokenizer.ids_to_text(tokens) for tokens in expected]
    cli = str(Path(sys.executable).parent / "canary-transcribe")
    common = [*map(str, paths), "--model", str(folder), "--source-lang", "de", "--no-pnc", "--greedy"]
    result = subprocess.run([cli, *common, "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["tokens"] for r in records] == expected
    assert [r["audio"] for r in records] == [str(p) for p in paths]
    plain = subprocess.run([cli, *common], capture_output=True, text=True)
    assert plain.stdout.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, [r["text"] for r in records])]
    assert [r["text"] for r in records] == texts


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{wav}", "--model", "{model}", "--source-lang", "fr"], 2, "'fr'"),
        (["{missing}", "--model", "{model}"], 1, "no such audio file"),
        (["{wav}", "--model", "{missing}"], 1, "nope: no such folder (and not a Hugging Face repo id"),
        (["{text}", "--model", "{model}"], 1, "install ffmpeg"),
        (["{wav}", "--model", "{model}", "--beam-size", "0"], 2, "beam_size must be at least 1, got 0"),
    ],
)
def test_cli_errors(converted: dict, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    wav, text = tmp_path / "a.wav", tmp_path / "notes.mp3"
    soundfile.write(wav, SIGNALS[1], 16000)
    text.write_text("not audio")
    values = dict(wav=wav, model=converted["canary-sub8", "float32"], missing=tmp_path / "nope", text=text)
    cli = str(Path(sys.executable).parent / "canary-transcribe")
    result = subprocess.run([cli, *[a.format(**values) for a in args]], capture_output=True, text=True)
    assert result.returncode == code, result.stderr
    assert message in " ".join(result.stderr.split())


def test_parity_flag_records_the_report(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(str(checkpoint), str(tmp_path / "mlx"), "--parity")
    assert result.returncode == 0, result.stderr
    assert "greedy token ids" in result.stdout + result.stderr
    parity = json.loads((tmp_path / "mlx" / "conversion.json").read_text())["parity"]
    assert parity["passed"] and parity["tokens"] == {"greedy": True, "beam4": True}
    assert parity["encoder_rel_l2_batch"] <= 1e-4 and parity["logprobs_max_abs"] <= 1e-3


def test_parity_catches_a_wrong_weight(checkpoint: Path, tmp_path: Path) -> None:
    folder = convert(str(checkpoint), tmp_path / "mlx", ConvertOptions()).out
    file = weight_files(folder)[0]
    weights = mx.load(str(file))
    mx.eval(weights)  # read everything before the file is rewritten
    key = "encoder.layers.0.feed_forward1.linear1.weight"
    weights[key] = weights[key] * 1.01  # a 1% error in one matrix
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    with pytest.raises(ParityError) as caught:
        run_parity(checkpoint, load_model(folder))
    assert isinstance(caught.value, ValidationError) and caught.value.exit_code == 3
    assert any(f.startswith("encoder relative L2") for f in caught.value.report.failures)


def test_parity_without_nemo_says_how_to_install(checkpoint: Path, tmp_path: Path) -> None:
    # A real process in which `import nemo` fails, as on a machine with the runtime alone.
    code = ("import sys; sys.modules['nemo'] = None; from canary_convert.cli import convert_app; "
            "sys.argv = ['canary-convert', sys.argv[1], sys.argv[2], '--parity']; convert_app()")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(tmp_path / "mlx")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "--parity needs NeMo: pip install" in " ".join(result.stderr.split())
    assert not (tmp_path / "mlx").exists()
