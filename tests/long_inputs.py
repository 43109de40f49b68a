"""Long test inputs, and NeMo's fixed-chunk long-form inference as its example script runs it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from omegaconf import OmegaConf

from canary_convert.parity import reference_signals
from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
from long_audio import build_long_audio  # noqa: E402,F401  (examples/ is not a package; the demo's own builder)

__all__ = ["build_long_audio", "long_signal", "nemo_frame_batch", "write"]


def long_signal(seconds: float, seed: int = 5) -> np.ndarray:
    """Speech-like stretches of different lengths end to end, over a little noise (never pure silence)."""
    pieces = reference_signals(16000, (7.3, 11.1, 9.4, 13.2, 6.6, 8.8, 12.0, 10.9, 9.9, 4.4) * 4)
    signal = np.concatenate(pieces)[: int(seconds * 16000)]
    return (signal + 0.01 * np.random.default_rng(seed).standard_normal(signal.size)).astype(np.float32)


def write(path: Path, signal: np.ndarray) -> Path:
    soundfile.write(path, signal, 16000, subtype="FLOAT")
    return path


def nemo_frame_batch(nemo: Any, path: Path, chunk_seconds: float, prompt: dict[str, str],
                     strategy: str = "greedy", beam_size: int = 1, timestamps: bool = False) -> Any:
    """NeMo's FrameBatchMultiTaskAED as speech_to_text_aed_chunked_infer.py runs it (batch of 4 chunks)."""
    from nemo.collections.asr.parts.utils.streaming_utils import FrameBatchMultiTaskAED

    nemo.change_decoding_strategy(OmegaConf.merge(nemo.cfg.decoding, {"strategy": strategy,
                                                                      "beam": {"beam_size": beam_size}}))
    frame_asr = FrameBatchMultiTaskAED(nemo, frame_len=chunk_seconds, total_buffer=chunk_seconds, batch_size=4)
    frame_asr.reset()
    meta = {"source_lang": prompt["source_lang"], "target_lang": prompt["target_lang"], "pnc": prompt["pnc"],
            "taskname": "asr", "timestamp": "yes" if timestamps else "no"}
    model_stride = nemo.cfg.preprocessor.window_stride * nemo.cfg.encoder.subsampling_factor
    frame_asr.read_audio_file(str(path), 0, model_stride, meta_data=meta)
    return frame_asr, frame_asr.transcribe(timestamps=timestamps)
