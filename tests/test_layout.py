"""`--layout mlx-audio`: one folder that mlx-audio 0.6.2 loads strictly and canary-convert's model reads too.

mlx-audio serves one SentencePiece tokenizer with the canary2 prompt (canary-1b-v2's kind), so the tiny
single-BPE variants are the ones to test; the aggregate-tokenizer families are refused up front.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_audio.stt import load as mlx_audio_load

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.model.aed.decoding import max_generation_length
from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.model.app.transcribe import pad_batch
from canary_convert.parity import compare_stages, nemo_prompt_slots, nemo_transcribe_tokens, reference_signals, restore_nemo
from canary_convert.verify import compare_folders, verify_folder
from conftest import run_cli
from factory import QUANTIZABLE_VARIANTS, VARIANTS

SERVED = sorted(name for name, spec in {**VARIANTS, **QUANTIZABLE_VARIANTS}.items() if spec.tokenizer == "bpe")
REFUSED = sorted(name for name, spec in VARIANTS.items() if spec.tokenizer != "bpe")
SIGNALS = reference_signals(16000)


@pytest.fixture(scope="module")
def sources(checkpoints: dict[str, Path], quantizable_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return {**checkpoints, **quantizable_checkpoints}


@pytest.fixture(scope="module")
def nemo_greedy(sources: dict[str, Path]) -> dict[str, list[list[int]]]:
    """NeMo's own greedy transcripts of the test signals (English, punctuation on), per served variant."""
    tokens = {}
    for name in SERVED:
        nemo = restore_nemo(sources[name])
        tokens[name] = nemo_transcribe_tokens(nemo, SIGNALS, "greedy", 1, nemo_prompt_slots("canary2", "en", "en", True))
    return tokens


def _mlx_audio_greedy(model, encoded: mx.array, lengths: mx.array, prompt: list[int], eos: int, budget: int) -> list[int]:
    """mlx-audio's own decoder, stepped as its generate() steps it (argmax of the logits, its KV cache, its
    positions), from the prompt NeMo builds."""
    mask = (mx.arange(encoded.shape[1])[None] < lengths[:, None]).astype(mx.float32)
    logits, cache = model.decoder(mx.array([prompt]), encoded, encoder_mask=mask, cache=None, start_pos=0)
    tokens: list[int] = []
    for step in range(budget):
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        tokens.append(token)
        logits, cache = model.decoder(mx.array([[token]]), encoded, encoder_mask=mask, cache=cache,
                                      start_pos=len(prompt) + step)
    return tokens


@pytest.mark.parametrize("variant", SERVED)
@pytest.mark.parametrize("precision", ["float32", "8-bit"])
def test_mlx_audio_loads_strictly_and_agrees(sources: dict[str, Path], nemo_greedy: dict, tmp_path: Path,
                                             variant: str, precision: str) -> None:
    quantize = QuantizeOptions.create(8) if precision == "8-bit" else None
    folder = convert(str(sources[variant]), tmp_path / "ma", ConvertOptions(layout="mlx-audio", quantize=quantize)).out
    theirs = mlx_audio_load(str(folder), strict=True)  # every stored weight found its place, none left random
    ours = load_model(folder)
    assert (tmp_path / "ma" / "tokenizer.model").is_file() and theirs._tokenizer is not None
    if quantize is not None and variant in QUANTIZABLE_VARIANTS:
        assert type(theirs.decoder.blocks[0].ff1).__name__ == "QuantizedLinear"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "canary" and config["enc_output_dim"] == ours.config.decoder.hidden_size

    tokenizer = ours.tokenizer
    prompt = build_prompt("canary2", tokenizer, PromptOptions("en"))
    # Ours as NeMo's transcribe() runs it: the signals in one batch, whose padded length sets the greedy budget.
    mine = [result.tokens for result in ours.transcribe(SIGNALS, strategy="greedy")]
    assert mine == nemo_greedy[variant]
    batch, batch_lengths = pad_batch(SIGNALS)
    padded_frames = ours.encode(*ours.preprocess(mx.array(batch), mx.array(batch_lengths)))[0].shape[1]
    budget = max_generation_length(ours.config.decoder.max_sequence_length, padded_frames, len(prompt),
                                   ours.config.decoding.greedy_max_generation_delta)
    for index, signal in enumerate(SIGNALS):
        features, frames = ours.preprocess(mx.array(signal[None]), mx.array([signal.size]))
        encoded, lengths = ours.encode(features, frames)
        count = int(frames[0])
        # The same features through mlx-audio's encoder: equal within float32 rounding.
        their_encoded, their_lengths = theirs.encoder(features.transpose(0, 2, 1)[:, :count], mx.array([count]))
        assert int(their_lengths[0]) == int(lengths[0])
        relative = float(mx.linalg.norm(their_encoded - encoded[:, : int(lengths[0])]) / mx.linalg.norm(encoded))
        assert relative < 1e-5, relative
        # Teacher-forced on the same states and tokens: equal log-probabilities.
        ids = mx.array([prompt + list(range(5, 25))])
        mask = (mx.arange(encoded.shape[1])[None] < lengths[:, None]).astype(mx.float32)
        logits, _ = theirs.decoder(ids, encoded, encoder_mask=mask)
        their_logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert float(mx.abs(their_logprobs - ours.decoder_logprobs(ids, encoded, lengths)).max()) < 2e-5
        # mlx-audio's decoder, greedy on the utterance alone with the same budget: our tokens (NeMo's in float32).
        assert _mlx_audio_greedy(theirs, encoded, lengths, prompt, tokenizer.eos_id, budget) == mine[index]


def test_what_mlx_audio_does_differently(sources: dict[str, Path], tmp_path: Path) -> None:
    """Measured, not hidden: mlx-audio's own front end and prompt are not NeMo's (README, "Folders for mlx-audio")."""
    folder = convert(str(sources["canary2-bpe-w64"]), tmp_path / "ma", ConvertOptions(layout="mlx-audio")).out
    theirs, ours = mlx_audio_load(str(folder), strict=True), load_model(folder)
    signal = SIGNALS[0]
    features, frames = ours.preprocess(mx.array(signal[None]), mx.array([signal.size]))  # NeMo's, to 1e-5
    their_features = np.array(theirs._preprocess_audio(mx.array(signal))[0])
    count = int(frames[0])
    # One frame more than NeMo's len // hop, and log-mels that differ by far more than rounding.
    assert their_features.shape[0] == count + 1
    assert np.abs(their_features[:count] - np.array(features[0, :, :count]).T).max() > 1e-2
    # NeMo's canary2 prompt through this tokenizer starts with SentencePiece's word-start piece; mlx-audio's
    # hand-built prompt does not.
    nemo_prompt = build_prompt("canary2", ours.tokenizer, PromptOptions("en"))
    assert theirs._tokenizer.build_prompt_tokens("en", "en", True) == nemo_prompt[1:]
    assert ours.tokenizer.id_to_piece(nemo_prompt[0]) == "▁"


@pytest.mark.parametrize("variant", REFUSED)
def test_aggregate_families_are_refused_up_front(sources: dict[str, Path], tmp_path: Path, variant: str) -> None:
    result = run_cli(str(sources[variant]), str(tmp_path / "out"), "--layout", "mlx-audio")
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    message = result.stderr.replace("\n", " ")
    assert "--layout mlx-audio cannot serve this checkpoint" in message and "tokenizer.type='agg'" in message


def test_one_folder_both_libraries_and_every_check(sources: dict[str, Path], tmp_path: Path) -> None:
    """The bundled model on an mlx-audio folder matches NeMo as on its own layout, verifies from its goldens, and
    holds exactly the tensors of the canary-convert layout (--against compares by the bundled model's names)."""
    source = sources["canary2-bpe-proj-w64"]
    layout = convert(str(source), tmp_path / "ma", ConvertOptions(layout="mlx-audio")).out
    own = convert(str(source), tmp_path / "own", ConvertOptions()).out
    report = compare_stages(restore_nemo(source), load_model(layout), SIGNALS)
    assert report.passed and report.encoder_rel_l2_batch < 1e-4 and report.logprobs_max_abs < 1e-3
    assert verify_folder(layout, str(layout), "cpu").exit_code == 0
    against = compare_folders(own, layout, "own against mlx-audio", "cpu")
    assert [check.status for check in against.checks if check.name == "tensors"] == ["pass"]
    assert sorted(p.name for p in layout.iterdir()) == [
        "README.md", "config.json", "conversion.json", "goldens.json", "model.safetensors", "nemo-buffers.tensors",
        "tokenizer.model", "tokenizer.vocab", "vocab.txt"]
    card = (layout / "README.md").read_text()
    assert "--gen-kwargs '{\"source_lang\": \"en\", \"target_lang\": \"en\"}'" in card and "- mlx-audio" in card
