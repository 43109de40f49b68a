"""The bundled MLX CTC model: NeMo's EncDecCTCModelBPE at inference, built from `config.json`."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..app.transcribe import AudioInput, FileProgress, Transcript
from ..config import CTCConfig
from ..speech import AudioBatch, BatchDecoder, Decoded, SpeechModel
from ..subwords import SubwordText
from ..tokenizer import Tokenizer
from .greedy import greedy_batch


class CTCHead(nn.Module):
    """NeMo's ConvASRDecoder: a kernel-1 Conv1d from d_model to the vocabulary and the blank, then
    log_softmax over the classes (a 1x1 convolution is a Linear over each frame)."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(d_model, num_classes)  # the conv's (O, I, 1) weight, squeezed by the mapping

    def __call__(self, encoded: mx.array) -> mx.array:
        logits = self.classifier(encoded)
        # NeMo computes the head in the encoder's dtype; log_softmax in float32 keeps the blank's tail exact.
        return nn.log_softmax(logits.astype(mx.float32), axis=-1)


class CTCModel(SpeechModel):
    """preprocessor -> FastConformer encoder -> CTC head; greedy decoding as NeMo's greedy_batch."""

    config_class = CTCConfig
    config: CTCConfig

    def __init__(self, config: CTCConfig, tokenizer: Tokenizer | None = None):
        super().__init__(config, tokenizer)
        self.decoder = CTCHead(config.encoder.d_model, config.ctc.num_classes)
        self._subwords = SubwordText.of(tokenizer) if tokenizer is not None else None

    def decode_text(self, ids: list[int]) -> str:
        """NeMo's CTC text: the tokenizer's decoding, then one space before a punctuation mark of the
        vocabulary removed (CTCBPEDecoding's decode_tokens_to_str_with_strip_punctuation)."""
        assert self._subwords is not None
        return self._subwords.text(ids)

    def stage_logprobs(self, encoded: mx.array, enc_lengths: mx.array) -> mx.array:
        """Per-frame log-probabilities (B, T'', V+1) over the vocabulary and the blank (the last class)."""
        return self.decoder(encoded)

    def logprobs(self, features: mx.array, frames: mx.array) -> tuple[mx.array, mx.array]:
        """Features -> per-frame log-probabilities and the valid frame counts."""
        encoded, enc_lengths = self.encode(features, frames)
        return self.decoder(encoded), enc_lengths

    def golden_decoders(self) -> dict[str, BatchDecoder]:
        return {"greedy": self.batch_decoder()}

    def batch_decoder(self) -> BatchDecoder:
        """Greedy CTC over a batch (NeMo's greedy_batch): merged tokens and the frame that emits each."""

        def decode_batch(batch: AudioBatch) -> list[Decoded]:
            logprobs, lengths = self.logprobs(batch.features, batch.frames)
            return greedy_batch(logprobs, lengths, self.config.ctc.blank_id)

        return decode_batch

    def transcribe(self, audio: AudioInput, batch_size: int = 4, chunking: str = "nemo",
                   chunk_seconds: float | None = None, progress: FileProgress | None = None,
                   **unsupported: Any) -> list[Transcript]:
        """Paths or 16 kHz float32 arrays (one or a list) -> one Transcript each, with `.text`, `.tokens` and
        `.token_frames` (the encoder frame that emits each token). NeMo's transcribe() decodes every input
        whole (`chunking="nemo"`); "pauses" cuts long ones at pauses (app/chunking.py)."""
        return self.transcribe_without_prompt(audio, self.batch_decoder(), False, batch_size, chunking, chunk_seconds,
                                              progress, unsupported)
