"""`--layout parakeet-mlx`: one folder that parakeet-mlx 0.6.0 loads strictly and canary-convert's model reads too.

parakeet-mlx computes its own mel features, so the comparison feeds it ours (NeMo's, to 1e-5): its encoder must
then give our states and its greedy search our tokens, which are NeMo's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from parakeet_mlx import from_pretrained

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import ModelFolderError, UnsupportedModelError, UsageError
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.parity import reference_signals
from canary_convert.verify import compare_folders, verify_folder
from factory import CTC_VARIANTS, build_ctc
from transducer_factory import VARIANTS, build

# Signals of a second or more: NeMo's transcribe() pads shorter clips with silence, which parakeet-mlx does not.
SIGNALS = reference_signals(16000)
# parakeet-mlx's class for each family it serves; the hybrid RNN-T/CTC (no durations) it cannot build.
SERVED = {"tdt-80": "ParakeetTDT", "rnnt-128": "ParakeetRNNT", "tdt-ctc-80": "ParakeetTDTCTC"}
REFUSED = "rnnt-ctc-128"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained asks the Hub first and falls back to the folder: offline, that ask fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so set it too


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nemo-parakeet-mlx")
    return {name: build(VARIANTS[name], folder / f"{name}.nemo") for name in [*SERVED, REFUSED]}


@pytest.fixture(scope="module")
def folders(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per variant: the parakeet-mlx layout (float32 and bfloat16) and canary-convert's own layout."""
    out = tmp_path_factory.mktemp("parakeet-mlx-folders")
    return {name: {"parakeet-mlx": convert(str(path), out / f"{name}-pm", ConvertOptions(layout="parakeet-mlx")).out,
                   "bfloat16": convert(str(path), out / f"{name}-pm-bf16",
                                       ConvertOptions(layout="parakeet-mlx", dtype="bfloat16")).out,
                   "own": convert(str(path), out / f"{name}-own", ConvertOptions()).out}
            for name, path in checkpoints.items() if name in SERVED}


@pytest.fixture(scope="module")
def nemo_tokens(checkpoints: dict[str, Path]) -> dict[str, list[list[int]]]:
    """NeMo's own greedy tokens for each signal, transcribed one at a time (no padding from a batch)."""
    from nemo.collections.asr.models import ASRModel
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(nemo_logging.ERROR)
    tokens = {}
    for name in SERVED:
        nemo = ASRModel.restore_from(str(checkpoints[name]), map_location="cpu").eval()
        hypotheses = nemo.transcribe(list(SIGNALS), batch_size=1, return_hypotheses=True, verbose=False)
        tokens[name] = [hypothesis.y_sequence.tolist() for hypothesis in hypotheses]
    return tokens


def _stored_names(folder: Path) -> set[str]:
    return set(mx.load(str(folder / "model.safetensors")))


def _relative(a: mx.array, b: mx.array) -> float:
    return float(mx.linalg.norm(a.astype(mx.float32) - b) / mx.linalg.norm(b))


@pytest.mark.parametrize("variant", SERVED)
def test_parakeet_mlx_loads_strictly_and_agrees_with_nemo(folders: dict, nemo_tokens: dict, variant: str) -> None:
    folder = folders[variant]["parakeet-mlx"]
    theirs, ours = from_pretrained(str(folder), dtype=mx.float32), load_model(folder)
    assert type(theirs).__name__ == SERVED[variant]
    parameters = dict(tree_flatten(theirs.parameters()))
    # Strict both ways: model.safetensors holds exactly parakeet-mlx's parameters (load_weights is strict too).
    assert set(parameters) == _stored_names(folder)
    assert {value.dtype for value in parameters.values()} == {mx.float32}
    assert getattr(theirs, "durations", []) == ours.config.decoding.durations
    assert theirs.max_symbols == ours.config.decoding.max_symbols
    assert theirs.vocabulary == [ours.tokenizer.id_to_piece(i) for i in range(ours.config.blank_id)]

    mine = [result.tokens for result in ours.transcribe(SIGNALS, batch_size=1)]
    assert mine == nemo_tokens[variant] and sum(map(len, mine)) > 20
    for index, signal in enumerate(SIGNALS):
        features, frames = ours.preprocess(mx.array(signal[None]), mx.array([signal.size]))
        encoded, lengths = ours.encode(features, frames)
        count, valid = int(frames[0]), int(lengths[0])
        mel = features.transpose(0, 2, 1)[:, :count]
        their_encoded, their_lengths = theirs.encoder(mel, mx.array([count]))
        assert int(their_lengths[0]) == valid
        assert _relative(their_encoded, encoded[:, :valid]) < 1e-5
        # Its greedy TDT search, on our states and on its own: our tokens (NeMo's).
        on_ours, _ = theirs.decode(encoded[:, :valid], lengths)
        on_theirs, _ = theirs.decode(their_encoded, their_lengths)
        assert [token.id for token in on_ours[0]] == mine[index]
        assert [token.id for token in on_theirs[0]] == mine[index]
        # The card's recipe: generate() on our features.
        assert [token.id for token in theirs.generate(mel)[0].tokens] == mine[index]
        if hasattr(theirs, "ctc_decoder"):  # the hybrid's auxiliary CTC head: our log-probs
            their_ctc = theirs.ctc_decoder(encoded[:, :valid])
            assert float(mx.abs(their_ctc - ours.ctc_logprobs(encoded[:, :valid])).max()) < 1e-5


@pytest.mark.parametrize("variant", SERVED)
def test_parakeet_mlx_loads_in_bfloat16(folders: dict, variant: str) -> None:
    """Its default: the float32 folder cast at load, and a folder stored in bfloat16, both strictly; the encoder
    within bfloat16's rounding of ours (measured 7e-3 to 9e-3)."""
    ours = load_model(folders[variant]["own"])
    signal = SIGNALS[0]
    features, frames = ours.preprocess(mx.array(signal[None]), mx.array([signal.size]))
    encoded, lengths = ours.encode(features, frames)
    for kind in ("parakeet-mlx", "bfloat16"):
        folder = folders[variant][kind]
        theirs = from_pretrained(str(folder))
        parameters = dict(tree_flatten(theirs.parameters()))
        assert set(parameters) == _stored_names(folder)
        assert {value.dtype for value in parameters.values()} == {mx.bfloat16}
        mel = features.transpose(0, 2, 1)[:, : int(frames[0])].astype(mx.bfloat16)
        their_encoded, their_lengths = theirs.encoder(mel, frames)
        assert int(their_lengths[0]) == int(lengths[0])
        assert _relative(their_encoded, encoded) < 2e-2


@pytest.mark.parametrize("variant", SERVED)
def test_bundled_model_reads_the_parakeet_mlx_folder(folders: dict, variant: str) -> None:
    """The same folder through canary-convert's model: the summed LSTM biases give the gates NeMo's two give,
    so its transcripts (with timestamps) are the own layout's; verify passes on it."""
    layout, own = folders[variant]["parakeet-mlx"], folders[variant]["own"]
    theirs, ours = load_model(layout), load_model(own)
    for mine, reference in zip(theirs.transcribe(SIGNALS, timestamp=True), ours.transcribe(SIGNALS, timestamp=True),
                               strict=True):
        assert (mine.text, mine.tokens, list(mine.token_frames)) == (reference.text, reference.tokens,
                                                                     list(reference.token_frames))
    assert verify_folder(layout, str(layout), "cpu").exit_code == 0
    # --against across layouts: every tensor identical by the bundled model's names, the LSTM biases as their sum.
    against = compare_folders(own, layout, "own against parakeet-mlx", "cpu")
    assert [check.status for check in against.checks if check.name == "tensors"] == ["pass"]
    assert sorted(path.name for path in layout.iterdir()) == [
        "README.md", "config.json", "conversion.json", "goldens.json", "model.safetensors", "nemo-buffers.tensors",
        "tokenizer"]
    config = json.loads((layout / "config.json").read_text())
    assert ("tdt_durations" in config.get("model_defaults", {})) == bool(VARIANTS[variant].durations)
    assert config["layout"]["added"] == {f"prediction.lstm.{n}.hidden.bias": f"prediction.lstm.{n}.input.bias"
                                         for n in range(VARIANTS[variant].pred_layers)}
    card = (layout / "README.md").read_text()
    assert f'from_pretrained("{layout.name}", dtype=mx.float32)' in card and "- parakeet-mlx" in card
    assert f"parakeet-mlx speech.wav --model {layout.name}" in card and "differ from NeMo's" in card


def test_hybrid_without_durations_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="builds a hybrid RNN-T/CTC model only with TDT durations"):
        convert(str(checkpoints[REFUSED]), tmp_path / "h", ConvertOptions(layout="parakeet-mlx"))
    assert not (tmp_path / "h").exists()


def test_quantize_is_refused_for_parakeet_mlx(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    options = ConvertOptions(layout="parakeet-mlx", quantize=QuantizeOptions.create(8))
    with pytest.raises(UsageError, match="parakeet-mlx 0.6.0 loads float weights only"):
        convert(str(checkpoints["tdt-80"]), tmp_path / "q", options)
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def ctc_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny EncDecCTCModelBPE and its folders in both layouts."""
    source = build_ctc(CTC_VARIANTS["ctc-sub4"], tmp_path_factory.mktemp("nemo-ctc") / "ctc.nemo")
    out = tmp_path_factory.mktemp("parakeet-mlx-ctc")
    return source, {"parakeet-mlx": convert(str(source), out / "pm", ConvertOptions(layout="parakeet-mlx")).out,
                    "own": convert(str(source), out / "own", ConvertOptions()).out}


def test_ctc_model_in_parakeet_mlx_agrees_with_nemo(ctc_folders: tuple[Path, dict[str, Path]]) -> None:
    """EncDecCTCModelBPE as parakeet-mlx's ParakeetCTC: strict load, its encoder and CTC head on our features
    as ours, its greedy tokens ours (NeMo's text); the bundled model reads the folder as its own layout."""
    from nemo.collections.asr.models import ASRModel

    source, folders = ctc_folders
    folder = folders["parakeet-mlx"]
    theirs, ours = from_pretrained(str(folder), dtype=mx.float32), load_model(folder)
    assert type(theirs).__name__ == "ParakeetCTC"
    assert set(dict(tree_flatten(theirs.parameters()))) == _stored_names(folder)
    results = ours.transcribe(SIGNALS, batch_size=1)
    nemo = ASRModel.restore_from(str(source), map_location="cpu").eval()
    assert [result.text for result in results] == [h.text for h in nemo.transcribe(list(SIGNALS), batch_size=1,
                                                                                   verbose=False)]
    assert sum(len(result.tokens) for result in results) > 10
    for signal, result in zip(SIGNALS, results, strict=True):
        features, frames = ours.preprocess(mx.array(signal[None]), mx.array([signal.size]))
        encoded, lengths = ours.encode(features, frames)
        count, valid = int(frames[0]), int(lengths[0])
        their_encoded, their_lengths = theirs.encoder(features.transpose(0, 2, 1)[:, :count], mx.array([count]))
        assert int(their_lengths[0]) == valid and _relative(their_encoded, encoded[:, :valid]) < 1e-5
        their_logprobs = theirs.decoder(encoded[:, :valid])
        assert float(mx.abs(their_logprobs - ours.stage_logprobs(encoded, lengths)[:, :valid]).max()) < 1e-5
        assert [token.id for token in theirs.decode(their_encoded, their_lengths)[0]] == result.tokens
    own = load_model(folders["own"])
    assert [r.tokens for r in own.transcribe(SIGNALS)] == [r.tokens for r in ours.transcribe(SIGNALS)]
    assert verify_folder(folder, str(folder), "cpu").exit_code == 0
    against = compare_folders(folders["own"], folder, "own against parakeet-mlx", "cpu")
    assert [check.status for check in against.checks if check.name == "tensors"] == ["pass"]
    assert json.loads((folder / "config.json").read_text())["layout"]["reshape"] == {
        "decoder.classifier.weight": [ours.config.ctc.num_classes, ours.config.encoder.d_model]}


def test_a_layout_record_that_does_not_fit_is_one_line(ctc_folders: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    """config.json's reshape and added records are checked against the stored tensors before anything loads."""
    folder = tmp_path / "pm"
    shutil.copytree(ctc_folders[1]["parakeet-mlx"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["layout"]["reshape"]["decoder.classifier.weight"] = [3, 7]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"layout.reshape: decoder.classifier.weight \(\d+, 1, \d+\) cannot take"):
        load_model(folder)
    config["layout"]["reshape"] = {}
    config["layout"]["added"] = {"decoder.classifier.bias": "encoder.nothing"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="layout.added: decoder.classifier.bias is added into encoder.nothing"):
        load_model(folder)
