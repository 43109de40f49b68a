"""The bundled MLX transducer: NeMo's EncDecRNNTBPEModel (RNNT or TDT) and EncDecHybridRNNTCTCBPEModel at
inference, built from `config.json`."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ...errors import UsageError
from ..app.transcribe import AudioInput, FileProgress, Transcript
from ..ctc.greedy import greedy_batch as ctc_greedy_batch
from ..ctc.model import CTCHead
from ..speech import AudioBatch, BatchDecoder, Decoded, FrameWord, SpeechModel
from ..subwords import SubwordText
from ..tokenizer import Tokenizer
from .config import TransducerConfig
from .decoding import TransducerHypothesis, greedy_batch
from .network import Joint, PredictionNetwork

# The heads `transcribe(decoder=...)` chooses between: the transducer (NeMo's default) and the hybrid's CTC head.
TRANSDUCER, CTC = "transducer", "ctc"


class TransducerModel(SpeechModel):
    """preprocessor -> FastConformer encoder -> prediction network + joint (and the hybrid's CTC head)."""

    config_class = TransducerConfig
    config: TransducerConfig

    def __init__(self, config: TransducerConfig, tokenizer: Tokenizer | None = None):
        super().__init__(config, tokenizer)
        self.prediction = PredictionNetwork(config.prediction)
        self.joint = Joint(config.joint, config.encoder.d_model, config.prediction.pred_hidden, config.num_outputs)
        if config.ctc is not None:
            self.ctc = CTCHead(config.encoder.d_model, config.ctc.num_classes)
        self._subwords = SubwordText.of(tokenizer) if tokenizer is not None else None

    @property
    def heads(self) -> tuple[str, ...]:
        return (TRANSDUCER, CTC) if self.config.ctc is not None else (TRANSDUCER,)

    def decode_text(self, ids: list[int]) -> str:
        """NeMo's text: the pieces decoded, then one space before a punctuation mark of the vocabulary removed."""
        assert self._subwords is not None
        return self._subwords.text(ids)

    def joint_logits(self, encoded: mx.array, labels: mx.array) -> mx.array:
        """Teacher-forced joint outputs (B, T, U+1, V+1+D) for encoder states (B, T, E) and labels (B, U): NeMo's
        joint(encoder, decoder(labels)) before its log-softmax."""
        pred = self.joint.pred(self.prediction.sequence(labels))
        return self.joint(self.joint.enc(encoded)[:, :, None], pred[:, None])

    def stage_logprobs(self, encoded: mx.array, enc_lengths: mx.array) -> mx.array:
        """The joint's log-probabilities (B, T, V+1+D) on every frame after the start of sequence: what NeMo's
        joint gives on a CPU (log_softmax over all outputs, durations included); a hybrid's CTC log-probs
        (V+1) follow on each frame, so the goldens cover both heads' weights."""
        logits = self.joint_logits(encoded, mx.zeros((encoded.shape[0], 0), dtype=mx.int32))[:, :, 0]
        joint = nn.log_softmax(logits.astype(mx.float32), axis=-1)
        return joint if self.config.ctc is None else mx.concatenate([joint, self.ctc_logprobs(encoded)], axis=-1)

    def ctc_logprobs(self, encoded: mx.array) -> mx.array:
        """The hybrid's CTC log-probabilities (B, T, V+1)."""
        if self.config.ctc is None:
            raise UsageError(f"{self.config.family}: this checkpoint has no CTC head")
        return self.ctc(encoded)

    def greedy(self, encoded: mx.array, lengths: mx.array) -> list[TransducerHypothesis]:
        """NeMo's greedy_batch (label looping) over a padded batch of encoder states."""
        decoding = self.config.decoding
        return greedy_batch(self.prediction, self.joint, encoded, lengths, self.config.blank_id,
                            decoding.max_symbols, decoding.durations)

    def words(self, hypothesis: TransducerHypothesis) -> list[FrameWord]:
        """NeMo's word offsets (encoder frames) of a transducer hypothesis."""
        assert self._subwords is not None
        durations = hypothesis.durations if self.config.decoding.durations else None
        tokens = self._subwords.tokens(hypothesis.tokens, hypothesis.frames, durations)
        return [FrameWord(word.text, word.start, word.end) for word in self._subwords.words(tokens)]

    def golden_decoders(self) -> dict[str, BatchDecoder]:
        """The transducer head's greedy decoding (what NeMo's transcribe() uses; the goldens' modes are named
        by TOKEN_MODES, so a hybrid's CTC head is fingerprinted by its log-probs, `stage_logprobs`)."""
        return {"greedy": self.batch_decoder()}

    def batch_decoder(self, decoder: str = TRANSDUCER) -> BatchDecoder:
        """Greedy decoding of a batch with the chosen head: tokens, the frame of each, and timed words."""
        if decoder not in self.heads:
            raise UsageError(f"{self.config.family}: decoder {decoder!r}: choose {' or '.join(self.heads)}")

        def decode_batch(batch: AudioBatch) -> list[Decoded]:
            encoded, lengths = self.encode(batch.features, batch.frames)
            if decoder == CTC:
                return ctc_greedy_batch(self.ctc_logprobs(encoded), lengths, self.config.blank_id)
            return [Decoded(hyp.tokens, True, hyp.frames, self.words(hyp)) for hyp in self.greedy(encoded, lengths)]

        return decode_batch

    def transcribe(self, audio: AudioInput, batch_size: int = 4, chunking: str = "nemo",
                   chunk_seconds: float | None = None, progress: FileProgress | None = None,
                   timestamp: bool | None = None, decoder: str | None = None,
                   **unsupported: Any) -> list[Transcript]:
        """Paths or 16 kHz float32 arrays (one or a list) -> one Transcript each, with `.text`, `.tokens`,
        `.token_frames` (the encoder frame each token was emitted on) and, with `timestamp`, NeMo's words and
        segments. `decoder` picks the hybrid's head ("transducer", NeMo's default, or "ctc")."""
        return self.transcribe_without_prompt(audio, self.batch_decoder(decoder or TRANSDUCER), bool(timestamp),
                                              batch_size, chunking, chunk_seconds, progress, unsupported)
