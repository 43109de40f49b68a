"""The trained example Parakeet (examples/tiny-parakeet, a hybrid TDT-CTC model trained on the example's speech by
examples/train_tiny_parakeet.py): float32 and 8-bit conversions transcribe the committed clips as NeMo does, and
NeMo's decisions on them are far from ties, so the 8-bit agreement is a result, not luck."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.parity import nemo_features
from conftest import REPO, restore_nemo_models

sys.path.insert(0, str(REPO / "examples"))
from wer import word_error_rate  # noqa: E402  (examples/ is not a package)

EXAMPLE = REPO / "examples" / "tiny-parakeet"
RECORDS = json.loads((REPO / "examples" / "tiny-canary" / "references.json").read_text())
CLIPS = [soundfile.read(REPO / "examples" / "tiny-canary" / record["audio"], dtype="float32")[0] for record in RECORDS]
PRECISIONS = {"float32": ConvertOptions(), "8bit": ConvertOptions(quantize=QuantizeOptions.create(8))}


@pytest.fixture(scope="module")
def nemo() -> Any:
    return restore_nemo_models({"example": EXAMPLE / "tiny-parakeet.nemo"})["example"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("example-parakeet")
    return {name: convert(str(EXAMPLE / "tiny-parakeet.nemo"), folder / name, options).out
            for name, options in PRECISIONS.items()}


def test_the_training_scripts_tdt_loss_is_the_papers() -> None:
    """examples/train_tiny_parakeet.py computes TDT's loss itself (NeMo 3.0's TDT losses need CUDA): its
    vectorised forward variable equals a per-element loop of eq. 7 of the TDT paper, durations 0-4."""
    import torch
    from train_tiny_parakeet import SIGMA, tdt_loss

    durations, vocab = (0, 1, 2, 3, 4), 7
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 9, 5, vocab + 1 + len(durations), generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (3, 4), generator=generator)
    frames, label_lengths = torch.tensor([9, 7, 5]), torch.tensor([4, 2, 3])
    got = tdt_loss(logits.float(), labels, frames, label_lengths, durations, vocab)
    tokens = torch.log_softmax(logits[..., : vocab + 1], -1) - SIGMA
    spans = torch.log_softmax(logits[..., vocab + 1:], -1)
    for row in range(3):
        alpha: dict[tuple[int, int], torch.Tensor] = {}
        for t in range(logits.shape[1]):
            for u in range(logits.shape[2]):
                terms = [torch.tensor(0.0, dtype=torch.float64)] if t == u == 0 else []
                for n, d in enumerate(durations):
                    if d > 0 and t >= d:  # a blank lasting d frames
                        terms.append(alpha[t - d, u] + tokens[row, t - d, u, vocab] + spans[row, t - d, u, n])
                    if u > 0 and t >= d:  # label u lasting d frames
                        terms.append(alpha[t - d, u - 1] + tokens[row, t - d, u - 1, labels[row, u - 1]]
                                     + spans[row, t - d, u - 1, n])
                alpha[t, u] = torch.logsumexp(torch.stack(terms), 0) if terms else torch.tensor(-1e4)
        end, count = int(frames[row]), int(label_lengths[row])
        final = torch.logsumexp(torch.stack([alpha[end - d, count] + tokens[row, end - d, count, vocab]
                                             + spans[row, end - d, count, n]
                                             for n, d in enumerate(durations) if 0 < d <= end]), 0)
        assert abs(float(got[row]) - float(-final / (count + 1))) <= 1e-4


def _transcribe(nemo: Any, head: str, batch_size: int = 4) -> list[Any]:
    """NeMo's transcribe() of the committed clips with timestamps, from the transducer or the CTC head. A TDT
    token's duration is taken one clip at a time (batch_size=1): NeMo's batched search can store a row's duration
    from another row's last joint call."""
    nemo.change_decoding_strategy(decoder_type=head, verbose=False)
    hypotheses = nemo.transcribe(CLIPS, batch_size=batch_size, return_hypotheses=True, timestamps=True, verbose=False)
    nemo.change_decoding_strategy(decoder_type="rnnt", verbose=False)
    nemo.eval()  # transcribe() leaves the encoder's conv stack in training mode
    return hypotheses


def _encoded(nemo: Any, clip: np.ndarray) -> Any:
    import torch

    features, frames = nemo_features(nemo, [clip])
    with torch.no_grad():
        encoded, lengths = nemo.encoder(audio_signal=torch.from_numpy(features), length=torch.from_numpy(frames))
    return encoded[:, :, : int(lengths[0])].transpose(1, 2)  # [1, T, D]


def _greedy_with_gaps(nemo: Any, encoded: Any) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]],
                                                           list[float], list[float]]:
    """NeMo's TDT greedy rule replayed one decision at a time on NeMo's own modules: the (label, frame, duration)
    of each token, the (frame, labels so far) of every decision, and each decision's top-2 gaps (token logits,
    duration logits)."""
    import torch

    durations = list(nemo.cfg.model_defaults.tdt_durations)
    blank, max_symbols = nemo.decoder.blank_idx, nemo.cfg.decoding.greedy.max_symbols
    tokens, points, token_gaps, duration_gaps = [], [], [], []
    state, label, frame, on_frame = None, blank, 0, 0
    projected = nemo.joint.project_encoder(encoded)
    with torch.no_grad():
        predicted, next_state = nemo.decoder.predict(torch.tensor([[label]]), state, add_sos=False, batch_size=1)
        while frame < projected.shape[1]:
            logits = nemo.joint.joint_net(projected[:, frame] + nemo.joint.project_prednet(predicted[:, 0]))[0]
            token_top = torch.topk(logits[: blank + 1], 2).values
            duration_top = torch.topk(logits[blank + 1:], 2).values
            token_gaps.append(float(token_top[0] - token_top[1]))
            duration_gaps.append(float(duration_top[0] - duration_top[1]))
            points.append((frame, len(tokens)))
            token = int(torch.argmax(logits[: blank + 1]))
            duration = durations[int(torch.argmax(logits[blank + 1:]))]
            if token == blank:
                frame, on_frame = frame + max(duration, 1), 0
                continue
            tokens.append((token, frame, duration))
            state = next_state
            predicted, next_state = nemo.decoder.predict(torch.tensor([[token]]), state, add_sos=False, batch_size=1)
            on_frame = on_frame + 1 if duration == 0 else 0
            frame += duration
            if on_frame >= max_symbols:
                frame, on_frame = frame + 1, 0
    return tokens, points, token_gaps, duration_gaps


def test_the_example_is_trained(nemo: Any) -> None:
    """NeMo's own transcripts of the committed clips: each head listens (different clips, different texts) and
    gets the training voices' clips (nearly) right; the held-out voices are harder (training.json has the WER)."""
    references = [record["nopnc"] for record in RECORDS]
    heard = [i for i, record in enumerate(RECORDS) if record["kind"] != "heldout-voice"]
    scores = {}
    for head in ("rnnt", "ctc"):
        texts = [hypothesis.text for hypothesis in _transcribe(nemo, head)]
        assert len(set(texts)) > len(texts) // 2
        scores[head] = word_error_rate([references[i] for i in heard], [texts[i] for i in heard])
    print(f"\nWER on the training voices' clips: TDT {scores['rnnt']:.1%}, CTC {scores['ctc']:.1%}")
    assert scores["rnnt"] == 0.0 and scores["ctc"] <= 0.1


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_transcripts_equal_nemo(nemo: Any, converted: dict[str, Path], precision: str) -> None:
    """Tokens, their frames, TDT durations, words and segments (transducer head), and the CTC head's tokens and
    frames, equal NeMo's transcribe() on every committed clip, in batches of 4."""
    model = load_model(converted[precision])
    hypotheses = _transcribe(nemo, "rnnt")
    results = model.transcribe(CLIPS, batch_size=4, timestamp=True)
    for hypothesis, result in zip(hypotheses, results, strict=True):
        assert result.text == hypothesis.text and result.tokens
        assert result.tokens == hypothesis.y_sequence.tolist()
        assert list(result.token_frames) == [int(frame) for frame in hypothesis.timestamp["timestep"]]
        assert [(w.text, w.start, w.end) for w in result.words] == [
            (w["word"], w["start"], w["end"]) for w in hypothesis.timestamp["word"]]
        assert [(s.text, s.start, s.end) for s in result.segments] == [
            (s["segment"], s["start"], s["end"]) for s in hypothesis.timestamp["segment"]]
    for hypothesis, clip in zip(_transcribe(nemo, "rnnt", batch_size=1), CLIPS, strict=True):
        features, frames = nemo_features(nemo, [clip])
        encoded, lengths = model.encode(mx.array(features), mx.array(frames))
        ours = model.greedy(encoded, lengths)[0]
        assert ours.tokens == hypothesis.y_sequence.tolist()
        assert ours.durations == list(hypothesis.token_duration)
    ctc = _transcribe(nemo, "ctc")
    for hypothesis, result in zip(ctc, model.transcribe(CLIPS, batch_size=4, decoder="ctc"), strict=True):
        assert result.text == hypothesis.text and result.tokens
        assert list(result.token_frames) == [int(entry["end_offset"]) for entry in hypothesis.timestamp["char"]]


def _collapsed(ids: np.ndarray, blank: int) -> list[int]:
    """CTC's greedy rule: repeats merged, blanks dropped."""
    return [int(token) for index, token in enumerate(ids) if token != blank and (index == 0 or token != ids[index - 1])]


def test_decisions_are_far_from_ties_and_from_the_8bit_error(nemo: Any, converted: dict[str, Path]) -> None:
    """Every greedy decision NeMo's TDT search takes on the committed clips (the token, blanks included, and the
    duration) wins by more than twice the most the 8-bit conversion moves any logit there, so no rounding can
    flip it. The CTC head (a linear layer on the frozen encoder, less sure of itself) has a few frames within the
    8-bit error's reach: counted, with those whose flip alone would change the transcript."""
    import torch

    quantized = load_model(converted["8bit"])
    blank = nemo.decoder.blank_idx
    gaps: dict[str, list[float]] = {"token": [], "duration": [], "ctc": []}
    reach: dict[str, list[float]] = {"token": [], "duration": [], "ctc": []}  # 8-bit error / gap, per decision
    edges, deciding = 0, 0
    for clip, hypothesis in zip(CLIPS, _transcribe(nemo, "rnnt", batch_size=1), strict=True):
        encoded = _encoded(nemo, clip)
        tokens, points, token_gaps, duration_gaps = _greedy_with_gaps(nemo, encoded)
        # The replay is NeMo's decoding: the same labels, frames and durations.
        assert [(token, frame) for token, frame, _ in tokens] == list(zip(
            hypothesis.y_sequence.tolist(), [int(frame) for frame in hypothesis.timestamp["timestep"]], strict=True))
        assert [duration for _, _, duration in tokens] == list(hypothesis.token_duration)
        labels = torch.tensor([[token for token, _, _ in tokens]])
        with torch.no_grad():  # NeMo's joint logits for every (frame, labels so far), before its log-softmax
            predicted, *_ = nemo.decoder(targets=labels, target_length=torch.tensor([labels.shape[1]]))
            joint = nemo.joint
            reference = joint.joint_net(joint.project_encoder(encoded)[:, :, None]
                                        + joint.project_prednet(predicted.transpose(1, 2))[:, None])[0].numpy()
            ctc_reference = nemo.ctc_decoder(encoder_output=encoded.transpose(1, 2))[0].numpy()
        features, frames = nemo_features(nemo, [clip])
        ours_encoded, ours_lengths = quantized.encode(mx.array(features), mx.array(frames))
        ours_encoded = ours_encoded[:, : int(ours_lengths[0])]
        ours = np.array(quantized.joint_logits(ours_encoded, mx.array(labels.numpy()))[0])
        for (frame, emitted), token_gap, duration_gap in zip(points, token_gaps, duration_gaps, strict=True):
            moved = np.abs(ours[frame, emitted] - reference[frame, emitted])
            reach["token"].append(float(moved[: blank + 1].max() / token_gap))
            reach["duration"].append(float(moved[blank + 1:].max() / duration_gap))
        gaps["token"] += token_gaps
        gaps["duration"] += duration_gaps
        ranked = np.argsort(ctc_reference, axis=-1)
        top = np.take_along_axis(ctc_reference, ranked[:, -2:], axis=-1)
        ctc_gaps = top[:, 1] - top[:, 0]
        ctc_reach = np.abs(np.array(quantized.ctc_logprobs(ours_encoded)[0]) - ctc_reference).max(axis=-1) / ctc_gaps
        gaps["ctc"] += ctc_gaps.tolist()
        reach["ctc"] += ctc_reach.tolist()
        chosen = ranked[:, -1]
        for frame in np.flatnonzero(ctc_reach >= 0.5):
            flipped = chosen.copy()
            flipped[frame] = ranked[frame, -2]
            edges += 1
            deciding += _collapsed(flipped, blank) != _collapsed(chosen, blank)
    print("\n" + "; ".join(f"{name}: {len(values)} decisions, top-2 gap min {min(values):.3f} median "
                           f"{np.median(values):.2f} logits, 8-bit error / gap max {max(reach[name]):.3f}"
                           for name, values in gaps.items())
          + f"; CTC frames within the 8-bit error's reach: {edges}, {deciding} of them deciding a token")
    assert max(reach["token"]) < 0.5 and max(reach["duration"]) < 0.5
    assert edges <= len(gaps["ctc"]) // 50
    assert np.median(gaps["token"]) > 5 and np.median(gaps["ctc"]) > 5
