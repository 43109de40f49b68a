"""NeMo parity: run NeMo and the converted MLX model on the same signals and measure each stage.

Each stage gets NeMo's own input (features for the encoder, encoder states for the decoder), so an
error is charged to the stage that made it. NeMo is imported only here, only when asked.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import CanaryConvertError, TranscriptWarning, ValidationError
from .model.app.audio_io import load_audio
from .model.aed.canary import CanaryModel, teacher_forced_tokens
from .model.app.clips import pad_batch

TEST_SIGNAL_SECONDS = (2.3, 1.1, 3.4)  # a padded batch of three different lengths


@dataclass(frozen=True)
class Thresholds:
    """Limits per precision: float32 conversions must match closely, half precision and quantized weights
    within their rounding (README, "Proof against NeMo", has the figures they were set from).

    Log-probs are compared over the whole vocabulary on random text, so quantization's errors show most in
    the far tail (tokens at -30); 4-bit token ids may legitimately differ and are reported, not required.
    """

    features_max_abs: float
    encoder_rel_l2: float
    logprobs_max_abs: float | None  # not bounded for half-precision weights
    tokens_identical: bool = True

    @classmethod
    def for_precision(cls, dtype: str, bits: int | None = None) -> Thresholds:
        if bits == 4:
            return cls(features_max_abs=1e-3, encoder_rel_l2=0.25, logprobs_max_abs=15.0, tokens_identical=False)
        if bits == 8:
            return cls(features_max_abs=1e-3, encoder_rel_l2=2e-2, logprobs_max_abs=1.0)
        if dtype == "float32":
            return cls(features_max_abs=1e-3, encoder_rel_l2=1e-4, logprobs_max_abs=1e-3)
        return cls(features_max_abs=1e-3, encoder_rel_l2=2e-2, logprobs_max_abs=None)


def precision_of(model: CanaryModel) -> tuple[str, Thresholds]:
    """A loaded model's precision ("float16", "4-bit affine (group 64), float32") and its limits."""
    dtype = str(model.compute_dtype).removeprefix("mlx.core.")
    record = model.config.quantization
    if record is None:
        return dtype, Thresholds.for_precision(dtype)
    label = f"{record['bits']}-bit {record.get('mode', 'affine')} (group {record['group_size']}), {dtype}"
    return label, Thresholds.for_precision(dtype, record["bits"])


@dataclass(frozen=True)
class StageOutputs:
    """One model's output at each stage on a padded batch of signals, each stage fed the model's own input.

    `logprobs` are teacher-forced on `teacher_forced_tokens` (the BOS token, then fixed pseudo-random text).
    """

    features: np.ndarray  # (B, n_mels, T), float32
    frames: np.ndarray  # (B,) valid feature frames
    encoded: np.ndarray  # (B, T', H), float32, after the encoder->decoder projection
    enc_lengths: np.ndarray  # (B,)
    logprobs: np.ndarray  # (B, L, V), float32


@dataclass
class ParityReport:
    dtype: str  # the precision's label (see precision_of)
    thresholds: Thresholds
    features_max_abs: float = 0.0
    encoder_rel_l2_single: float = 0.0
    encoder_rel_l2_batch: float = 0.0
    logprobs_max_abs: float = 0.0
    tokens: dict[str, bool] = field(default_factory=dict)  # decoding mode -> identical to NeMo on every clip
    failures: list[str] = field(default_factory=list)
    # NeMo's own outputs, kept for the golden outputs' reference (not part of the report's record).
    reference: StageOutputs | None = field(default=None, repr=False, compare=False)
    reference_tokens: dict[str, list[list[int]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self) -> None:
        limits = self.thresholds
        measured = [
            ("features max |Δ|", self.features_max_abs, limits.features_max_abs),
            ("encoder relative L2 (single)", self.encoder_rel_l2_single, limits.encoder_rel_l2),
            ("encoder relative L2 (batch)", self.encoder_rel_l2_batch, limits.encoder_rel_l2),
            ("decoder log-prob max |Δ|", self.logprobs_max_abs, limits.logprobs_max_abs),
        ]
        self.failures = [f"{name} {value:.3g} > {limit:g}" for name, value, limit in measured
                         if limit is not None and not value <= limit]
        if limits.tokens_identical:
            self.failures += [f"{mode} tokens differ from NeMo's" for mode, same in self.tokens.items() if not same]

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, measured, limit, ok) for the CLI's table."""
        limits = self.thresholds
        rows = [
            ("features max |Δ|", f"{self.features_max_abs:.2e}", f"{limits.features_max_abs:g}",
             self.features_max_abs <= limits.features_max_abs),
            ("encoder rel L2, single", f"{self.encoder_rel_l2_single:.2e}", f"{limits.encoder_rel_l2:g}",
             self.encoder_rel_l2_single <= limits.encoder_rel_l2),
            ("encoder rel L2, batch", f"{self.encoder_rel_l2_batch:.2e}", f"{limits.encoder_rel_l2:g}",
             self.encoder_rel_l2_batch <= limits.encoder_rel_l2),
            ("decoder log-prob max |Δ|", f"{self.logprobs_max_abs:.2e}",
             "-" if limits.logprobs_max_abs is None else f"{limits.logprobs_max_abs:g}",
             limits.logprobs_max_abs is None or self.logprobs_max_abs <= limits.logprobs_max_abs),
        ]
        wanted = "identical" if limits.tokens_identical else "reported"
        rows += [(f"{mode} token ids", "identical" if same else "differ", wanted, same or not limits.tokens_identical)
                 for mode, same in self.tokens.items()]
        return rows

    def to_dict(self) -> dict[str, Any]:
        record = {key: value for key, value in asdict(self).items() if key not in ("reference", "reference_tokens")}
        record["passed"] = self.passed
        return record


class NemoUnavailableError(CanaryConvertError):
    """--parity needs NeMo, which is an optional (dev) dependency."""


class ParityError(ValidationError):
    """The converted model is further from NeMo than the thresholds allow; carries the full report."""

    def __init__(self, report: ParityReport):
        super().__init__("parity with NeMo failed: " + "; ".join(report.failures))
        self.report = report


def reference_signals(sample_rate: int, seconds: tuple[float, ...] = TEST_SIGNAL_SECONDS) -> list[np.ndarray]:
    """Deterministic speech-like test signals: gliding harmonics with a syllable envelope and a little noise."""
    rng = np.random.default_rng(20261124)
    signals = []
    for index, duration in enumerate(seconds):
        t = np.arange(int(duration * sample_rate)) / sample_rate
        pitch = 110 + 40 * index + 30 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
        signals.append((0.1 * voice * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32))
    return signals


def require_nemo() -> None:
    """Fail before any work when NeMo is missing, with the command that installs it."""
    try:
        import nemo.collections.asr  # noqa: F401
    except ImportError:
        raise NemoUnavailableError(
            "--parity needs NeMo: pip install -c constraints.txt 'canary-convert[dev]' (nemo-toolkit[asr]==3.0.0)"
        ) from None


def restore_nemo(path: Path) -> Any:
    """NeMo's own model from the `.nemo` (or extracted folder), in eval mode on the CPU."""
    require_nemo()
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(nemo_logging.ERROR)  # NeMo prints its whole config at INFO; the table is what matters
    return EncDecMultiTaskModel.restore_from(str(path), map_location="cpu").eval()


def _relative_l2(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-30))


def nemo_features(nemo: Any, signals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    batch, lengths = pad_batch(signals)
    with torch.no_grad():
        features, frames = nemo.preprocessor(input_signal=torch.from_numpy(batch), length=torch.from_numpy(lengths))
    return features.numpy(), frames.numpy()


def nemo_encode(nemo: Any, features: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NeMo's encoder states (B, T, H_dec), after its encoder->decoder projection."""
    import torch

    with torch.no_grad():
        encoded, lengths = nemo.encoder(audio_signal=torch.from_numpy(features), length=torch.from_numpy(frames))
        encoded = nemo.encoder_decoder_proj(encoded.transpose(1, 2))
    return encoded.numpy(), lengths.numpy()


def nemo_logprobs(nemo: Any, tokens: np.ndarray, encoded: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import torch

    encoder_mask = torch.arange(encoded.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
    with torch.no_grad():
        hidden = nemo.transf_decoder(
            input_ids=torch.from_numpy(tokens),
            decoder_mask=torch.ones(tokens.shape, dtype=torch.bool),
            encoder_embeddings=torch.from_numpy(encoded),
            encoder_mask=encoder_mask,
        )
        return nemo.log_softmax(hidden_states=hidden).numpy()


def compare_stages(nemo: Any, model: CanaryModel, signals: list[np.ndarray]) -> ParityReport:
    """Features, encoder (each utterance alone and as a padded batch) and teacher-forced decoder log-probs,
    against the limits of the model's precision."""
    label, thresholds = precision_of(model)
    report = ParityReport(dtype=label, thresholds=thresholds)
    batch, lengths = pad_batch(signals)
    ours, _ = model.preprocess(mx.array(batch), mx.array(lengths))
    features, frames = nemo_features(nemo, signals)
    report.features_max_abs = max(
        float(np.abs(np.array(ours[row, :, :count]) - features[row, :, :count]).max())
        for row, count in enumerate(frames)
    )
    encoded, enc_lengths = nemo_encode(nemo, features, frames)
    mine, _ = model.encode(mx.array(features), mx.array(frames))
    mine = np.array(mine.astype(mx.float32))
    report.encoder_rel_l2_batch = max(
        _relative_l2(mine[row, :count], encoded[row, :count]) for row, count in enumerate(enc_lengths)
    )
    singles = []
    for row, signal in enumerate(signals):
        one_features, one_frames = nemo_features(nemo, [signal])
        alone, _ = model.encode(mx.array(one_features), mx.array(one_frames))
        count = int(enc_lengths[row])
        singles.append(_relative_l2(np.array(alone.astype(mx.float32))[0, :count], encoded[row, :count]))
    report.encoder_rel_l2_single = max(singles)
    tokens = teacher_forced_tokens(nemo.tokenizer.vocab_size, len(signals), [nemo.tokenizer.bos_id])
    reference = nemo_logprobs(nemo, tokens, encoded, enc_lengths)
    logprobs = model.decoder_logprobs(mx.array(tokens), mx.array(encoded).astype(model.compute_dtype),
                                      mx.array(enc_lengths))
    report.logprobs_max_abs = float(np.abs(np.array(logprobs.astype(mx.float32)) - reference).max())
    report.reference = StageOutputs(features, frames, encoded, enc_lengths, reference)
    report.check()
    return report


# Decoding modes the token check runs: NeMo's default search and a real beam.
TOKEN_MODES = {"greedy": ("greedy", 1), "beam4": ("beam", 4)}


def nemo_transcribe_tokens(nemo: Any, signals: list[np.ndarray], strategy: str, beam_size: int,
                           prompt: dict[str, str]) -> list[list[int]]:
    """NeMo's transcribe() on in-memory clips with one strategy; per clip, its hypothesis token ids."""
    from omegaconf import OmegaConf

    decoding = OmegaConf.merge(nemo.cfg.decoding, {"strategy": strategy, "beam": {"beam_size": beam_size}})
    nemo.change_decoding_strategy(decoding)
    hypotheses = nemo.transcribe(list(signals), batch_size=4, verbose=False, **prompt)
    return [h.y_sequence.tolist() for h in hypotheses]


def nemo_prompt_slots(prompt_format: str, source_lang: str, target_lang: str, pnc: bool) -> dict[str, str]:
    """transcribe() keywords NeMo's prompt formatters need (canary names the task; canary2 infers it and
    wants every slot filled: an empty decoder context, undefined emotion, the flags off)."""
    slots = {"source_lang": source_lang, "target_lang": target_lang, "pnc": "yes" if pnc else "no"}
    if prompt_format == "canary":
        slots["task"] = "transcribe" if source_lang == target_lang else "translate"
    else:
        slots.update(itn="no", timestamp="no", diarize="no", decodercontext="", emotion="<|emo:undefined|>")
    return slots


def token_pairs(nemo: Any, model: CanaryModel, signals: list[np.ndarray], source_lang: str, target_lang: str,
                pnc: bool = True) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Per decoding mode, (NeMo's token ids, ours) from each transcribe() on every clip."""
    slots = nemo_prompt_slots(model.config.prompt_format, source_lang, target_lang, pnc)
    task = "transcribe" if source_lang == target_lang else "translate"
    pairs = {}
    for name, (strategy, beam_size) in TOKEN_MODES.items():
        reference = nemo_transcribe_tokens(nemo, signals, strategy, beam_size, slots)
        with warnings.catch_warnings():
            # Only the token ids are compared here; a test signal decoded up to the budget is no news.
            warnings.simplefilter("ignore", TranscriptWarning)
            ours = model.transcribe(list(signals), source_lang=source_lang, target_lang=target_lang, task=task,
                                    pnc=pnc, strategy=strategy, beam_size=beam_size)
        pairs[name] = (reference, [r.tokens for r in ours])
    return pairs


def compare_tokens(nemo: Any, model: CanaryModel, signals: list[np.ndarray], source_lang: str,
                   target_lang: str, pnc: bool = True) -> dict[str, bool]:
    """Whether our transcribe() gives NeMo's token ids, per decoding mode, on every clip."""
    return {name: reference == ours
            for name, (reference, ours) in token_pairs(nemo, model, signals, source_lang, target_lang, pnc).items()}


def run_parity(source: Path, model: CanaryModel, audio_files: Sequence[Path] = ()) -> ParityReport:
    """Restore `source` with NeMo and measure it beside the converted `model` on the test signals and files.

    Stage errors and token ids (greedy and beam 4, transcribing in the model's first language) are both
    checked; raises ParityError past the thresholds.
    """
    nemo = restore_nemo(source)
    sample_rate = model.config.preprocessor.sample_rate
    signals = reference_signals(sample_rate) + [load_audio(path, sample_rate) for path in audio_files]
    # Teacher-forced references first: NeMo's decoder answers differently once a beam search has run on it.
    report = compare_stages(nemo, model, signals)
    language = model.tokenizer.languages[0]
    pairs = token_pairs(nemo, model, signals, language, language)
    report.tokens = {name: reference == ours for name, (reference, ours) in pairs.items()}
    report.reference_tokens = {name: reference for name, (reference, _) in pairs.items()}
    report.check()
    if not report.passed:
        raise ParityError(report)
    return report
