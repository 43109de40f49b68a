"""A standalone NeMo CTC model (EncDecCTCModelBPE): converted, and against NeMo stage by stage and token by token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import UsageError
from canary_convert.model.app.clips import pad_short
from canary_convert.model.ctc.model import CTCModel
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.parity import reference_signals
from canary_convert.rules import load_rules
from canary_convert.verify import verify_folder
from conftest import convert_each, encoder_matches_nemo, restore_nemo_models, run_cli
from factory import CTC_VARIANTS, build_ctc

# The reference signals plus two clips under a second (NeMo pads those with silence on both sides).
SIGNALS = reference_signals(16000) + reference_signals(16000, (0.6, 0.45))


@pytest.fixture(scope="module")
def ctc_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nemo-ctc")
    return {name: build_ctc(spec, folder / f"{name}.nemo") for name, spec in CTC_VARIANTS.items()}


@pytest.fixture(scope="module")
def ctc_nemo(ctc_checkpoints: dict[str, Path]) -> dict[str, Any]:
    return restore_nemo_models(ctc_checkpoints)


@pytest.fixture(scope="module")
def ctc_converted(ctc_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_each(ctc_checkpoints, tmp_path_factory.mktemp("mlx-ctc"))


def _nemo_transcribe(nemo: Any, signals: list[np.ndarray]) -> list[Any]:
    return nemo.transcribe([signal for signal in signals], batch_size=4, return_hypotheses=True, timestamps=True,
                           verbose=False)


def test_the_mapping_shares_the_encoder_rules_with_canary() -> None:
    ctc, canary, shared = load_rules("ctc.yaml"), load_rules("canary.yaml"), load_rules("fastconformer.yaml")
    written = lambda mapping: [rule.written for rule in mapping.rules]  # noqa: E731
    # Both begin with the included rules, in order, and add their own head's.
    assert written(ctc)[: len(shared.rules)] == written(shared) == written(canary)[: len(shared.rules)]
    assert written(ctc)[len(shared.rules):] == ["decoder.decoder_layers.0.weight", "decoder.decoder_layers.0.bias"]
    assert ctc.is_quantizable("encoder.layers.0.self_attn.linear_q.weight") and ctc.is_quantizable("decoder.classifier.weight")
    assert ctc.digest != shared.digest


@pytest.mark.parametrize("variant", sorted(CTC_VARIANTS))
def test_stages_match_nemo(ctc_nemo: dict, ctc_converted: dict, variant: str) -> None:
    import torch

    nemo, model = ctc_nemo[variant], load_model(ctc_converted[variant])
    assert isinstance(model, CTCModel)
    encoded, enc_lengths, ours, our_lengths = encoder_matches_nemo(nemo, model, SIGNALS)
    with torch.no_grad():
        logprobs = nemo.decoder(encoder_output=encoded).numpy()
    for row, valid in enumerate(enc_lengths):
        ours_logprobs = np.array(model.stage_logprobs(ours, our_lengths))[row, :valid]
        assert ours_logprobs.shape == logprobs[row, :valid].shape
        assert float(np.abs(ours_logprobs - logprobs[row, :valid]).max()) <= 1e-4


@pytest.mark.parametrize("variant", sorted(CTC_VARIANTS))
def test_greedy_tokens_and_frames_match_nemo_transcribe(ctc_nemo: dict, ctc_converted: dict, variant: str) -> None:
    nemo, model = ctc_nemo[variant], load_model(ctc_converted[variant])
    hypotheses = _nemo_transcribe(nemo, SIGNALS)
    results = model.transcribe(SIGNALS)
    emitted = 0
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.text == hypothesis.text
        # NeMo's y_sequence holds the frame log-probs; its greedy ids are their argmax, collapsed.
        labels = hypothesis.y_sequence.argmax(-1).tolist()
        merged = [label for index, label in enumerate(labels)
                  if label != model.config.ctc.blank_id and (index == 0 or label != labels[index - 1])]
        assert result.tokens == merged
        # NeMo's per-token end_offset (timestamp['char']) is the frame that emits the token.
        assert list(result.token_frames) == [int(entry["end_offset"]) for entry in hypothesis.timestamp["char"]]
        assert len(result.token_frames) == len(result.tokens)
        emitted += len(result.tokens)
    assert emitted > 10  # the randomised head emits text, so the comparison is not of empty lists


def test_greedy_decoding_on_a_constructed_path() -> None:
    from canary_convert.model.ctc.greedy import collapse

    blank = 5
    labels = np.array([[1, 1, blank, 1, 2, 2, blank, blank, 3, 3], [blank, 4, 4, 0, 0, 1, 9, 9, 9, 9]])
    first, second = collapse(labels, np.array([10, 6]), blank)
    # Repeats merge; a blank between two equal labels lets the second through; frames past the length are ignored.
    assert (first.tokens, first.frames) == ([1, 1, 2, 3], [0, 3, 4, 8])
    assert (second.tokens, second.frames) == ([4, 0, 1], [1, 3, 5])


def test_cli_transcribes_and_refuses_prompt_options(ctc_nemo: dict, ctc_converted: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    clip = tmp_path / "clip.wav"
    soundfile.write(clip, SIGNALS[0], 16000, subtype="FLOAT")
    tool = str(Path(sys.executable).parent / "canary-transcribe")
    folder = str(ctc_converted["ctc-sub4"])
    done = subprocess.run([tool, str(clip), "--model", folder, "--format", "json"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    nemo_text = _nemo_transcribe(ctc_nemo["ctc-sub4"], [SIGNALS[0]])[0].text
    assert json.loads(done.stdout)[0]["text"] == nemo_text
    refused = subprocess.run([tool, str(clip), "--model", folder, "--source-lang", "en"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "source_lang" in refused.stderr + refused.stdout
    with pytest.raises(UsageError, match="task"):
        load_model(ctc_converted["ctc-sub4"]).transcribe(SIGNALS[0], task="translate")


def test_dry_run_card_and_verify(ctc_checkpoints: dict, ctc_converted: dict, tmp_path: Path) -> None:
    folder = ctc_converted["ctc-sub4"]
    done = run_cli(str(ctc_checkpoints["ctc-sub4"]), str(tmp_path / "dry"), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "ctc-bpe" in done.stdout and "decoder.classifier.weight" in done.stdout
    assert not (tmp_path / "dry").exists()
    card = (folder / "README.md").read_text()
    assert "CTC over" in card and "--source-lang" not in card
    goldens = json.loads((folder / "goldens.json").read_text())
    decoding = goldens["groups"]["test-signals"]["decoding"]
    assert [record["mode"] for record in decoding] == ["greedy"] and any(decoding[0]["tokens"])
    report = verify_folder(folder, str(folder), "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]
    assert {check.name for check in report.checks} >= {"manifest", "strict load", "test-signals: greedy tokens"}


def test_a_changed_head_fails_verify(ctc_checkpoints: dict, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    folder = convert(str(ctc_checkpoints["ctc-sub4"]), tmp_path / "ctc", ConvertOptions()).out
    weights = load_file(str(folder / "model.safetensors"))
    # One class's bias up (a shift of every class would leave the log-softmax as it was).
    weights["decoder.classifier.bias"][0] += 0.5
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    report = verify_folder(folder, str(folder), "cpu")
    failed = {check.name for check in report.checks if check.status == "fail"}
    assert "manifest" in failed and "test-signals: logprobs" in failed


def test_quantized_ctc_loads_and_stays_close(ctc_checkpoints: dict, ctc_converted: dict, tmp_path: Path) -> None:
    conversion = convert(str(ctc_checkpoints["ctc-sub8-w64"]), tmp_path / "q8",
                         ConvertOptions(quantize=QuantizeOptions.create(8, 64)))
    assert "decoder.classifier" in conversion.quantization.quantized
    quantized, full = load_model(tmp_path / "q8"), load_model(ctc_converted["ctc-sub8-w64"])
    clip = pad_short(SIGNALS[0], 16000)
    logprobs = [np.array(model.logprobs(*model.preprocess(clip[None, :]))[0]) for model in (quantized, full)]
    assert 0 < float(np.abs(logprobs[0] - logprobs[1]).max()) < 0.5
    report = verify_folder(tmp_path / "q8", "q8", "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]
