"""Log-mel features exactly as NeMo's AudioToMelSpectrogramPreprocessor computes them at inference.

NeMo's FilterbankFeatures is the reference; the window and the mel filterbank are the checkpoint's own
buffers (`preprocessor.featurizer.window` / `.fb`), so nothing about librosa or window shapes is
recomputed here. Everything runs in float32, as NeMo forces float32 for its features.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import PreprocessorConfig
from ..masks import valid_mask

# NeMo's CONSTANT in features.py: added to the per-feature std so silence does not divide by zero.
NORMALIZE_EPS = 1e-5



class AudioPreprocessor(nn.Module):
    """Waveform (B, T) -> normalised log-mel features (B, n_mels, T'), no dither (inference only)."""

    def __init__(self, config: PreprocessorConfig):
        super().__init__()
        if config.normalize not in ("per_feature", "all_features"):
            raise ValueError(f"unsupported preprocessor.normalize={config.normalize!r}")
        if config.log_zero_guard_type not in ("add", "clamp"):
            raise ValueError(f"unsupported preprocessor.log_zero_guard_type={config.log_zero_guard_type!r}")
        if not isinstance(config.pad_to, int):
            raise ValueError(f"unsupported preprocessor.pad_to={config.pad_to!r} (only an int)")
        self.config = config
        self.win_length = config.win_length
        self.hop_length = config.hop_length
        self.n_fft = config.fft_size
        if config.exact_pad and self.hop_length % 2 == 1:
            raise ValueError("NeMo refuses exact_pad with an odd hop length")
        # NeMo pads (n_fft - hop) // 2 zeros each side itself when exact_pad and turns torch.stft's
        # centring off; otherwise torch.stft centres with n_fft // 2 zeros each side.
        self.signal_pad = (self.n_fft - self.hop_length) // 2 if config.exact_pad else 0
        self.stft_pad = 0 if config.exact_pad else self.n_fft // 2
        # Loaded from the checkpoint: NeMo's symmetric (periodic=False) window and librosa Slaney mel bank.
        self.window = mx.zeros((self.win_length,), dtype=mx.float32)
        self.filterbank = mx.zeros((config.features, self.n_fft // 2 + 1), dtype=mx.float32)

    def output_lengths(self, lengths: mx.array) -> mx.array:
        """Frame count per utterance: NeMo's get_seq_len, (len + 2*pad - n_fft) // hop, and 0 stays 0."""
        pad = 2 * (self.signal_pad if self.config.exact_pad else self.stft_pad)
        lengths = lengths.astype(mx.int32)
        frames = mx.floor_divide(lengths + pad - self.n_fft, self.hop_length)
        return mx.where(lengths == 0, 0, frames)

    def _guard(self) -> float:
        value = self.config.log_zero_guard_value
        # NeMo also accepts the strings "tiny" and "eps" (torch.finfo of the feature dtype, float32).
        if isinstance(value, str):
            info = np.finfo(np.float32)
            if value == "tiny":
                return float(info.tiny)
            if value == "eps":
                return float(info.eps)
            raise ValueError(f"unsupported log_zero_guard_value={value!r}")
        return float(value)

    def _stft_power(self, x: mx.array) -> mx.array:
        """|STFT|**mag_power as (B, frames, n_fft//2+1), torch.stft's framing with zero ('constant') padding."""
        if self.stft_pad:
            x = mx.pad(x, [(0, 0), (self.stft_pad, self.stft_pad)])
        n_frames = 1 + (x.shape[1] - self.n_fft) // self.hop_length
        index = mx.arange(n_frames)[:, None] * self.hop_length + mx.arange(self.n_fft)[None, :]
        frames = x[:, index]  # (B, frames, n_fft)
        # torch.stft centres a window shorter than n_fft inside the FFT frame, zeros either side.
        left = (self.n_fft - self.win_length) // 2
        window = mx.pad(self.window.astype(mx.float32), [(left, self.n_fft - self.win_length - left)])
        spectrum = mx.fft.rfft(frames * window, n=self.n_fft, axis=-1)
        # NeMo takes the magnitude sqrt(re^2 + im^2) first, then raises it to mag_power (2 = power).
        magnitude = mx.abs(spectrum).astype(mx.float32)
        if self.config.mag_power != 1.0:
            magnitude = mx.power(magnitude, self.config.mag_power)
        return magnitude

    def _normalize(self, x: mx.array, lengths: mx.array) -> mx.array:
        """NeMo's normalize_batch over the valid frames; x is (B, n_mels, frames)."""
        valid = valid_mask(lengths, x.shape[-1])[:, None, :]
        count = lengths.astype(mx.float32)[:, None, None]
        if self.config.normalize == "per_feature":
            mean = mx.where(valid, x, 0.0).sum(axis=-1, keepdims=True) / count
            # NeMo uses the unbiased (N - 1) std, 0 when a single frame makes it NaN, plus 1e-5.
            var = mx.square(mx.where(valid, x - mean, 0.0)).sum(axis=-1, keepdims=True) / (count - 1.0)
            std = mx.sqrt(var)
            std = mx.where(mx.isnan(std), 0.0, std) + NORMALIZE_EPS
            return mx.where(valid, (x - mean) / std, 0.0)
        # all_features: one mean and unbiased std per utterance over every feature of the valid frames,
        # applied to every frame (NeMo does not zero the padding here; the final mask does).
        n = count * x.shape[1]
        mean = mx.where(valid, x, 0.0).sum(axis=(1, 2), keepdims=True) / n
        var = mx.square(mx.where(valid, x - mean, 0.0)).sum(axis=(1, 2), keepdims=True) / (n - 1.0)
        return (x - mean) / (mx.sqrt(var) + NORMALIZE_EPS)

    def log_mel(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """Waveforms (B, T) -> log-mel features (B, n_mels, frames) before normalisation, and frame counts.

        This is NeMo's featurizer with `normalize=None`, what its buffered long-form inference computes once
        for a whole file before normalising each chunk on its own; frames past a length are not masked.
        """
        cfg = self.config
        x = audio.astype(mx.float32)
        lengths = lengths.astype(mx.int32)
        frame_lengths = self.output_lengths(lengths)
        if self.signal_pad:
            x = mx.pad(x, [(0, 0), (self.signal_pad, self.signal_pad)])
        if cfg.preemph is not None:
            # y[0] = x[0], y[t] = x[t] - a*x[t-1]; then NeMo zeroes samples at or past the *unpadded*
            # length, indexed on the (possibly exact-padded) signal.
            x = mx.concatenate([x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]], axis=1)
            x = mx.where(valid_mask(lengths, x.shape[1]), x, 0.0)
        power = self._stft_power(x)  # (B, frames, freq)
        mel = power @ self.filterbank.astype(mx.float32).T  # (B, frames, n_mels)
        mel = mel.transpose(0, 2, 1)
        if cfg.log:
            guard = self._guard()
            mel = mx.log(mel + guard) if cfg.log_zero_guard_type == "add" else mx.log(mx.maximum(mel, guard))
        return mel, frame_lengths

    def __call__(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        cfg = self.config
        mel, frame_lengths = self.log_mel(audio, lengths)
        mel = self._normalize(mel, frame_lengths)
        # Frames past the length take pad_value, then time is padded up to a multiple of pad_to.
        mel = mx.where(valid_mask(frame_lengths, mel.shape[-1])[:, None, :], mel, cfg.pad_value)
        if cfg.pad_to > 0 and mel.shape[-1] % cfg.pad_to:
            extra = cfg.pad_to - mel.shape[-1] % cfg.pad_to
            mel = mx.pad(mel, [(0, 0), (0, 0), (0, extra)], constant_values=cfg.pad_value)
        return mel, frame_lengths
