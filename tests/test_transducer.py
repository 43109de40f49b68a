"""NeMo's transducers (Parakeet RNNT, TDT and the hybrids with a CTC head): converted, and against NeMo stage by
stage, token by token (with frames and TDT durations) and word by word."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import soundfile
import yaml

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert, plan_only
from canary_convert.errors import ModelFolderError, TranscriptWarning, UnsupportedModelError, UsageError
from canary_convert.model.app.clips import pad_batch
from canary_convert.model.cpu import label_looping
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.model.transducer.decoding import UNBOUNDED_SYMBOLS, greedy_batch, greedy_batch_mlx
from canary_convert.model.transducer.model import TransducerModel
from canary_convert.parity import nemo_features, reference_signals
from canary_convert.rules import load_rules
from canary_convert.verify import verify_folder
from conftest import convert_each, copy_folder, encoder_matches_nemo, restore_nemo_models
from transducer_factory import QUANTIZABLE_VARIANTS, VARIANTS, build

# The reference signals plus two clips under a second (NeMo pads those with silence on both sides).
SIGNALS = reference_signals(16000) + reference_signals(16000, (0.6, 0.45))
TDT = sorted(name for name, spec in VARIANTS.items() if spec.durations)
HYBRID = sorted(name for name, spec in VARIANTS.items() if spec.hybrid)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nemo-transducer")
    specs = {**VARIANTS, **QUANTIZABLE_VARIANTS}
    return {name: build(spec, folder / f"{name}.nemo") for name, spec in specs.items()}


@pytest.fixture(scope="module")
def nemo_models(checkpoints: dict[str, Path]) -> dict[str, Any]:
    return restore_nemo_models(checkpoints)


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_each(checkpoints, tmp_path_factory.mktemp("mlx-transducer"))


def _nemo_transcribe(nemo: Any, signals: list[np.ndarray], batch_size: int = 4, head: str = "rnnt") -> list[Any]:
    """NeMo's transcribe() with timestamps, from the transducer or (a hybrid) the CTC head."""
    if hasattr(nemo, "cur_decoder"):
        nemo.change_decoding_strategy(decoder_type=head, verbose=False)
    hypotheses = nemo.transcribe(list(signals), batch_size=batch_size, return_hypotheses=True, timestamps=True,
                                 verbose=False)
    # NeMo's transcribe() leaves some modules in training mode (measured: the encoder's conv stack), where a
    # later direct call would use, and update, BatchNorm's batch statistics.
    nemo.eval()
    return hypotheses


def test_presets_and_mappings() -> None:
    transducer, shared = load_rules("transducer.yaml"), load_rules("fastconformer.yaml")
    written = [rule.written for rule in transducer.rules]
    assert written[: len(shared.rules)] == [rule.written for rule in shared.rules]
    hybrid = load_rules("transducer-ctc.yaml")
    assert [rule.written for rule in hybrid.rules][: len(transducer.rules)] == written
    for key in ("prediction.lstm.1.input.weight", "prediction.lstm.0.hidden.weight", "prediction.embed.weight",
                "joint.net.weight", "joint.enc.weight"):
        assert transducer.is_quantizable(key)
    assert hybrid.is_quantizable("ctc.classifier.weight") and not transducer.is_quantizable("joint.net.bias")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_detected_family_and_config(checkpoints: dict, converted: dict, variant: str) -> None:
    spec = VARIANTS[variant]
    config = json.loads((converted[variant] / "config.json").read_text())
    kind = "tdt" if spec.durations else "rnnt"
    assert config["family"] == f"parakeet-{kind}-ctc" if spec.hybrid else f"parakeet-{kind}"
    assert config["decoding"] == {"strategy": "greedy_batch", "max_symbols": 10, "durations": list(spec.durations)}
    assert config["prediction"] == {"pred_hidden": spec.pred_hidden, "pred_rnn_layers": spec.pred_layers,
                                    "vocab_size": spec.vocab}
    assert ("ctc" in config) == spec.hybrid
    # The joint's output layer is joint_net.2 behind a dropout (NVIDIA's releases), joint_net.1 without one.
    mapped = {tensor.source_key for tensor in plan_only(str(checkpoints[variant]), ConvertOptions()).plan.tensors}
    assert f"joint.joint_net.{2 if spec.dropout else 1}.weight" in mapped
    record = json.loads((converted[variant] / "conversion.json").read_text())
    assert record["validation"]["round_trip"] == "exact"
    card = (converted[variant] / "README.md").read_text()
    assert "pipeline_tag: automatic-speech-recognition" in card and "speech-translation" not in card
    assert f"| prediction network | {spec.pred_layers} LSTM layers, width {spec.pred_hidden}" in card
    assert ("auxiliary CTC head" in card) == spec.hybrid and ("TDT (durations" in card) == bool(spec.durations)


def test_nvidia_parakeet_releases_are_cc_by_4() -> None:
    from canary_convert.card import choose_licence
    from canary_convert.presets import presets

    by_name = {preset.name: preset for preset in presets()}
    for family, repo in (("parakeet-tdt", "nvidia/parakeet-tdt-0.6b-v2"), ("parakeet-rnnt", "nvidia/parakeet-rnnt-1.1b"),
                         ("parakeet-tdt-ctc", "nvidia/parakeet-tdt_ctc-110m")):
        assert choose_licence(None, None, repo, by_name[family].licenses).id == "cc-by-4.0"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stages_match_nemo(nemo_models: dict, converted: dict, variant: str) -> None:
    """Features, encoder (alone and in a padded batch), prediction network, joint and CTC log-probs."""
    import torch

    nemo, model = nemo_models[variant], load_model(converted[variant])
    assert isinstance(model, TransducerModel)
    encoded, enc_lengths, _, _ = encoder_matches_nemo(nemo, model, SIGNALS)
    labels = np.random.default_rng(3).integers(0, model.config.blank_id, (len(SIGNALS), 6))
    with torch.no_grad():
        prediction, _, _ = nemo.decoder(targets=torch.from_numpy(labels), target_length=torch.full((len(SIGNALS),), 6))
        nemo.joint.log_softmax = False  # the raw joint outputs (on a CPU NeMo log-softmaxes them by default)
        joint = nemo.joint.joint(encoded.transpose(1, 2), prediction.transpose(1, 2)).numpy()
        nemo.joint.log_softmax = None
        ctc = nemo.ctc_decoder(encoder_output=encoded).numpy() if hasattr(nemo, "ctc_decoder") else None
    encoded = encoded.transpose(1, 2).numpy()
    for row, valid in enumerate(enc_lengths):
        theirs = encoded[row, :valid]
        # Alone: the encoder gives the utterance what it gives it in the padded batch.
        one = pad_batch([SIGNALS[row]])
        alone, alone_length = model.encode(*model.preprocess(mx.array(one[0]), mx.array(one[1])))
        assert int(alone_length[0]) == valid
        assert np.linalg.norm(np.array(alone)[0, :valid] - theirs) / np.linalg.norm(theirs) <= 1e-5
    ours_prediction = np.array(model.prediction.sequence(mx.array(labels)))
    assert float(np.abs(ours_prediction - prediction.transpose(1, 2).numpy()).max()) <= 1e-5
    ours_joint = np.array(model.joint_logits(mx.array(encoded), mx.array(labels)))
    assert ours_joint.shape == joint.shape
    assert float(np.abs(ours_joint - joint).max() / np.abs(joint).max()) <= 1e-5
    if ctc is not None:
        ours_ctc = np.array(model.ctc_logprobs(mx.array(encoded)))
        for row, valid in enumerate(enc_lengths):
            assert float(np.abs(ours_ctc[row, :valid] - ctc[row, :valid]).max()) <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_labels_frames_and_durations_match_nemo_decoding(nemo_models: dict, converted: dict,
                                                               variant: str) -> None:
    """The label-looping search itself, on NeMo's encoder states of a padded batch: labels, frames, durations."""
    import torch

    nemo, model = nemo_models[variant], load_model(converted[variant])
    _nemo_transcribe(nemo, SIGNALS[:1])  # leaves NeMo's decoding with timestamps (and TDT durations) on
    reference, reference_frames = nemo_features(nemo, SIGNALS)
    with torch.no_grad():
        encoded, lengths = nemo.encoder(audio_signal=torch.from_numpy(reference),
                                        length=torch.from_numpy(reference_frames))
        hypotheses = nemo.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=lengths,
                                                                   return_hypotheses=True)
    ours = model.greedy(mx.array(encoded.transpose(1, 2).numpy()), mx.array(lengths.numpy()))
    emitted = 0
    for hypothesis, mine in zip(hypotheses, ours, strict=True):
        assert mine.tokens == hypothesis.y_sequence.tolist()
        assert mine.frames == [int(frame) for frame in hypothesis.timestamp["timestep"]]
        if VARIANTS[variant].durations:
            assert mine.durations == [int(duration) for duration in hypothesis.token_duration]
        emitted += len(mine.tokens)
    assert emitted > 20


@pytest.mark.parametrize("variant", TDT + ["rnnt-ctc-128"])
def test_search_on_varied_states_matches_nemo(nemo_models: dict, converted: dict, variant: str) -> None:
    """Random encoder states (wider than a random encoder gives) drive every rule of the search: TDT durations 0
    to 4 (a blank of duration 0 moves one frame), several labels on a frame, and rows of other lengths."""
    import torch

    nemo, model = nemo_models[variant], load_model(converted[variant])
    _nemo_transcribe(nemo, SIGNALS[:1])  # leaves NeMo's decoding with timestamps (and TDT durations) on
    generator = torch.Generator().manual_seed(7)
    encoded = 3.0 * torch.randn((4, model.config.encoder.d_model, 60), generator=generator)
    lengths = torch.tensor([60, 41, 17, 1])
    with torch.no_grad():
        hypotheses = nemo.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=lengths,
                                                                   return_hypotheses=True)
    ours = model.greedy(mx.array(encoded.transpose(1, 2).numpy()), mx.array(lengths.numpy()))
    seen_durations: set[int] = set()
    for hypothesis, mine in zip(hypotheses, ours, strict=True):
        assert mine.tokens == hypothesis.y_sequence.tolist()
        assert mine.frames == [int(frame) for frame in hypothesis.timestamp["timestep"]]
        if VARIANTS[variant].durations:
            assert mine.durations == [int(duration) for duration in hypothesis.token_duration]
            seen_durations.update(mine.durations)
    if VARIANTS[variant].durations:
        assert len(seen_durations) >= 3, seen_durations
    # Some frame holds more than one label.
    assert any(len(mine.frames) > len(set(mine.frames)) for mine in ours)


@pytest.mark.skipif(platform.machine().lower() in ("arm64", "aarch64"), reason="the C loop is for x86 CPUs")
@pytest.mark.parametrize("variant", TDT + ["rnnt-ctc-128"])
def test_c_loop_gives_the_mlx_loops_results(converted: dict, variant: str) -> None:
    """On x86 the search runs in C (cpu/label_looping.py): on varied states of a padded batch it gives the MLX
    loop's labels, frames and durations; it is prepared again when the weights change, and left to the MLX loop
    for half-precision weights. With NeMo's unbounded max_symbols the search still ends."""
    model = load_model(converted[variant])
    durations, max_symbols = model.config.decoding.durations, model.config.decoding.max_symbols
    prepared = label_looping.network(model.prediction, model.joint, durations)
    assert prepared is not None  # an x86 CPU, the extension built and OpenBLAS loaded (make install's)

    def both() -> tuple[list, list]:
        return (model.greedy(encoded, lengths), greedy_batch_mlx(model.prediction, model.joint, encoded, lengths,
                                                                  model.config.blank_id, max_symbols, durations))

    rows = np.random.default_rng(5).standard_normal((4, 60, model.config.encoder.d_model)).astype(np.float32)
    encoded, lengths = mx.array(3.0 * rows), mx.array([60, 41, 17, 1])
    native, reference = both()
    assert native == reference
    assert sum(len(hypothesis.tokens) for hypothesis in native) > 30
    model.joint.net.weight = model.joint.net.weight[::-1]  # other weights: other labels
    assert label_looping.network(model.prediction, model.joint, durations) is not prepared
    changed, reference = both()
    assert changed == reference and changed != native
    # A label that always wins (and, in TDT, lasts no frame): max_symbols on every frame, more than the C loop's
    # first buffers hold, so it runs again with room for them.
    bias = np.array(model.joint.net.bias)
    bias[0] += 100.0
    if durations:
        bias[model.config.blank_id + 1 + durations.index(0)] += 100.0
    model.joint.net.bias = mx.array(bias)
    crowded, reference = both()
    assert crowded == reference
    assert [len(hypothesis.tokens) for hypothesis in crowded] == [int(n) * max_symbols for n in lengths.tolist()]
    # NeMo's max_symbols: null would never leave a frame here; the search leaves it after UNBOUNDED_SYMBOLS.
    short, short_lengths, blank = encoded[:1, :3], mx.array([3]), model.config.blank_id
    unbounded = greedy_batch(model.prediction, model.joint, short, short_lengths, blank, None, durations)
    assert len(unbounded[0].tokens) == 3 * UNBOUNDED_SYMBOLS
    assert unbounded == greedy_batch_mlx(model.prediction, model.joint, short, short_lengths, blank,
                                         UNBOUNDED_SYMBOLS, durations)
    model.set_dtype(mx.bfloat16)
    assert label_looping.network(model.prediction, model.joint, durations) is None


@pytest.mark.parametrize("change, problem", [
    ({"max_symbols": 0}, "decoding.max_symbols: 0 is outside 1..1048576"),
    ({"durations": [0, 1, -2]}, "decoding.durations: [0, 1, -2] holds a value that is not a whole number >= 0"),
    ({"durations": [0, "1", 2]}, "decoding.durations: [0, '1', 2] is not a list, each a whole number within "
                                 "+-1048576"),
])
def test_a_folder_whose_search_would_not_end_is_refused(converted: dict, tmp_path: Path, change: dict,
                                                         problem: str) -> None:
    """No frames allowed per label, a duration that moves the search backwards, or one that is not a number (a
    list's items are checked by type like any config value), in a folder's config.json."""
    folder = copy_folder(converted["tdt-80"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["decoding"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=re.escape(f"config.json: {problem}")):
        load_model(folder)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transcribe_matches_nemo(nemo_models: dict, converted: dict, variant: str, batch_size: int) -> None:
    """transcribe(timestamps=True): text, tokens, their frames, words and segments as NeMo's, alone and batched."""
    nemo, model = nemo_models[variant], load_model(converted[variant])
    hypotheses = _nemo_transcribe(nemo, SIGNALS, batch_size)
    results = model.transcribe(SIGNALS, batch_size=batch_size, timestamp=True)
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.text == hypothesis.text
        assert result.tokens == hypothesis.y_sequence.tolist()
        assert list(result.token_frames) == [int(frame) for frame in hypothesis.timestamp["timestep"]]
        words = [(word.text, word.start, word.end) for word in result.words]
        assert words == [(word["word"], word["start"], word["end"]) for word in hypothesis.timestamp["word"]]
        segments = [(segment.text, segment.start, segment.end) for segment in result.segments]
        assert segments == [(segment["segment"], segment["start"], segment["end"])
                            for segment in hypothesis.timestamp["segment"]]


@pytest.mark.parametrize("variant", HYBRID)
def test_hybrid_ctc_head_matches_nemo(nemo_models: dict, converted: dict, variant: str) -> None:
    nemo, model = nemo_models[variant], load_model(converted[variant])
    hypotheses = _nemo_transcribe(nemo, SIGNALS, head="ctc")
    nemo.change_decoding_strategy(decoder_type="rnnt", verbose=False)
    results = model.transcribe(SIGNALS, decoder="ctc")
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.text == hypothesis.text
        assert list(result.token_frames) == [int(entry["end_offset"]) for entry in hypothesis.timestamp["char"]]
    with pytest.raises(UsageError, match="decoder"):
        model.transcribe(SIGNALS[0], decoder="beam")


def test_cli_transcribes_with_the_chosen_head(nemo_models: dict, converted: dict, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, SIGNALS[0], 16000, subtype="FLOAT")
    tool = str(Path(sys.executable).parent / "canary-transcribe")
    folder = str(converted["tdt-ctc-80"])
    for head, nemo_head in (("transducer", "rnnt"), ("ctc", "ctc")):
        done = subprocess.run([tool, str(clip), "--model", folder, "--decoder", head, "--timestamps", "--format",
                               "json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        reference = _nemo_transcribe(nemo_models["tdt-ctc-80"], [SIGNALS[0]], head=nemo_head)[0]
        assert json.loads(done.stdout)[0]["text"] == reference.text.strip()  # the JSON holds the text stripped
    nemo_models["tdt-ctc-80"].change_decoding_strategy(decoder_type="rnnt", verbose=False)
    refused = subprocess.run([tool, str(clip), "--model", str(converted["rnnt-128"]), "--decoder", "ctc"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "decoder" in refused.stderr + refused.stdout


def test_local_attention_on_ten_minutes_matches_nemo(checkpoints: dict, converted: dict, tmp_path: Path) -> None:
    """NVIDIA's long-audio recipe, change_attention_model("rel_pos_local_attn", [128, 128]): on a 10-minute input
    (and a 6-minute one padded beside it) the encoder states and the tokens with their frames are NeMo's."""
    import torch
    from nemo.collections.asr.models import ASRModel

    nemo = ASRModel.restore_from(str(checkpoints["tdt-ctc-80"]), map_location="cpu").eval()
    nemo.change_attention_model("rel_pos_local_attn", [128, 128])
    model = load_model(converted["tdt-ctc-80"])
    model.use_attention("local", (128, 128))
    signals = reference_signals(16000, (600.0, 360.0))
    reference, reference_frames = nemo_features(nemo, signals)
    with torch.no_grad():
        encoded, lengths = nemo.encoder(audio_signal=torch.from_numpy(reference),
                                        length=torch.from_numpy(reference_frames))
    ours = np.array(model.encode(mx.array(reference), mx.array(reference_frames))[0])
    encoded = encoded.transpose(1, 2).numpy()
    for row, valid in enumerate(lengths.tolist()):
        assert np.linalg.norm(ours[row, :valid] - encoded[row, :valid]) / np.linalg.norm(encoded[row, :valid]) <= 1e-5
    hypotheses = _nemo_transcribe(nemo, signals, batch_size=2)
    results = model.transcribe(signals, batch_size=2)
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.tokens == hypothesis.y_sequence.tolist() and len(result.tokens) > 100
        assert list(result.token_frames) == [int(frame) for frame in hypothesis.timestamp["timestep"]]
    with pytest.raises(UsageError, match="equal"):
        model.use_attention("local", (128, 64))
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, signals[1][: 16000 * 20], 16000, subtype="FLOAT")
    done = subprocess.run([str(Path(sys.executable).parent / "canary-transcribe"), str(clip), "--model",
                           str(converted["tdt-ctc-80"]), "--attention", "local", "--context", "128,128"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_whole_long_input_warns_of_full_attention_not_of_an_early_stop(converted: dict) -> None:
    """A file past the 40 s window is decoded whole, as NeMo's transcribe() decodes a transducer: the warning speaks
    of full attention's cost and NVIDIA's local-attention recipe (a transducer cannot stop early as Canary's
    decoder can), and there is none with local attention."""
    model = load_model(converted["rnnt-128"])
    signal = reference_signals(16000, (45.0,))[0]
    with pytest.warns(TranscriptWarning, match="45.0 s is decoded in one piece with full attention"):
        result = model.transcribe(signal)[0]
    assert result.over_window and len(result.tokens) > 10
    assert any("--attention local --context 128,128" in message for message in result.warnings)
    assert not any("stop early" in message for message in result.warnings)
    model.use_attention("local", (128, 128))
    local = model.transcribe(signal)[0]
    assert local.over_window and not any("attention" in message for message in local.warnings)


def test_verify_passes_and_records_each_head(converted: dict) -> None:
    folder = converted["rnnt-ctc-128"]
    goldens = json.loads((folder / "goldens.json").read_text())
    modes = [record["mode"] for record in goldens["groups"]["test-signals"]["decoding"]]
    assert modes == ["greedy"] and any(goldens["groups"]["test-signals"]["decoding"][0]["tokens"])
    report = verify_folder(folder, str(folder), "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]


def test_quantized_transducer_transcribes_as_nemo(checkpoints: dict, nemo_models: dict, tmp_path: Path) -> None:
    """8-bit: the LSTM, embedding and joint are stored quantized; on this model no decision is a near-tie, so
    the tokens and frames stay NeMo's."""
    conversion = convert(str(checkpoints["tdt-ctc-w64"]), tmp_path / "q8",
                         ConvertOptions(quantize=QuantizeOptions.create(8, 64)))
    quantized = conversion.quantization.quantized
    assert {"prediction.lstm.0.input", "prediction.lstm.0.hidden", "prediction.embed", "joint.enc", "joint.pred",
            "joint.net", "ctc.classifier"} <= quantized
    model = load_model(tmp_path / "q8")
    hypotheses = _nemo_transcribe(nemo_models["tdt-ctc-w64"], SIGNALS)
    results = model.transcribe(SIGNALS)
    assert sum(len(result.tokens) for result in results) > 10
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.tokens == hypothesis.y_sequence.tolist()
        assert list(result.token_frames) == [int(frame) for frame in hypothesis.timestamp["timestep"]]
    report = verify_folder(tmp_path / "q8", "q8", "cpu")
    assert report.exit_code == 0, [check for check in report.checks if check.status != "pass"]


def _with_config(source: Path, out: Path, change: dict[str, Any]) -> Path:
    """A copy of a .nemo whose model_config.yaml has dotted keys set to new values."""
    import tarfile

    with tarfile.open(source) as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}
    config = yaml.safe_load(members["./model_config.yaml"])
    for dotted, value in change.items():
        node = config
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    members["./model_config.yaml"] = yaml.safe_dump(config).encode()
    with tarfile.open(out, "w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("change, named", [
    ({"decoding.strategy": "beam"}, "decoding.strategy='beam'"),
    ({"decoding.greedy.loop_labels": False}, "decoding.greedy.loop_labels=False"),
    ({"decoder.normalization_mode": "layer"}, "decoder.normalization_mode='layer'"),
    ({"loss.loss_name": "multiblank_rnnt"}, "loss.loss_name='multiblank_rnnt'"),
])
def test_unsupported_settings_are_refused_up_front(checkpoints: dict, tmp_path: Path, change: dict,
                                                   named: str) -> None:
    source = _with_config(checkpoints["rnnt-128"], tmp_path / "changed.nemo", change)
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(").replace(")", r"\)")):
        plan_only(str(source), ConvertOptions())
    assert not (tmp_path / "out").exists()


def test_a_character_vocabulary_is_refused(checkpoints: dict, tmp_path: Path) -> None:
    source = _with_config(checkpoints["rnnt-128"], tmp_path / "chars.nemo",
                          {"target": "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel"})
    with pytest.raises(UnsupportedModelError, match="EncDecRNNTModel"):
        plan_only(str(source), ConvertOptions())
