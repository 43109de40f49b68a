"""The transducer models' `config.json` (Parakeet RNNT, TDT and the hybrids with a CTC head), as dataclasses.

Shared sections (front end, encoder, tokenizer files, quantization) come from SpeechConfig and the CTC head's
from the CTC family; the prediction network, joint and decoding sections name NeMo's settings as
`model_config.yaml` has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import MAX_CONFIG_INT, CTCHeadConfig, ConfigValueError, SpeechConfig, check_range


@dataclass(frozen=True)
class PredictionConfig:
    """NeMo's RNNTDecoder: an embedding of `vocab_size + 1` rows (the blank is the last, a zero padding row)
    and `pred_rnn_layers` LSTM layers of width `pred_hidden`."""

    pred_hidden: int
    pred_rnn_layers: int
    vocab_size: int  # without the blank


@dataclass(frozen=True)
class JointConfig:
    """NeMo's RNNTJoint: enc and pred projections to `joint_hidden`, the activation, then the output layer
    of `vocab_size + 1` token logits (blank last), followed by one logit per TDT duration."""

    joint_hidden: int
    activation: str


@dataclass(frozen=True)
class TransducerDecodingConfig:
    """NeMo's `decoding` for the checkpoint: greedy_batch with label looping (all we implement), the symbols
    allowed per frame, and the TDT durations (empty for RNNT)."""

    strategy: str
    max_symbols: int | None  # None: no limit (NeMo reads greedy.max_symbols: null so)
    durations: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_range(self, "max_symbols", 1, MAX_CONFIG_INT)
        # A negative duration would move the search backwards (and never end it); _from_dict saw whole numbers.
        if any(value < 0 for value in self.durations):
            raise ConfigValueError("durations", f"{self.durations!r} holds a value that is not a whole number >= 0")


@dataclass(frozen=True, kw_only=True)
class TransducerConfig(SpeechConfig):
    """NeMo's EncDecRNNTBPEModel and EncDecHybridRNNTCTCBPEModel (`model_type: transducer`): the FastConformer
    front, the prediction network and joint, greedy decoding, and the hybrid's CTC head."""

    prediction: PredictionConfig
    joint: JointConfig
    decoding: TransducerDecodingConfig
    ctc: CTCHeadConfig | None = None  # the hybrid's auxiliary CTC head

    _optional: ClassVar[tuple[str, ...]] = SpeechConfig._optional + ("ctc",)

    @property
    def blank_id(self) -> int:
        # NeMo: blank_idx = vocab_size, the row after the last token
        return self.prediction.vocab_size

    @property
    def num_outputs(self) -> int:
        """The joint's outputs: the tokens, the blank, then one score per TDT duration."""
        return self.prediction.vocab_size + 1 + len(self.decoding.durations)
