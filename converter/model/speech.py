"""What the application (app/) and the tools (validate, goldens, verify) need of a model, whatever its head.

Every family shares NeMo's front (preprocessor and FastConformer encoder, `fastconformer/`) and differs in
its head. A family is a `SpeechModel` subclass with its config class (registered in load.py by
`config.json`'s `model_type`) that implements three things:

- `transcribe(audio, ...)`: the public call, which gathers the family's own options (a prompt, a decoding
  strategy) into a `BatchDecoder` and hands it to `app.transcribe.transcribe`;
- `batch_decoder(...)`, the `BatchDecoder` itself: one padded `AudioBatch` in, one `Decoded` per row out
  (token ids, whether decoding ended on its own, and where the head knows them, frame offsets of tokens or
  of words). The application does batching, long audio, merging and transcripts with nothing else;
- `stage_logprobs(encoded, enc_lengths)`: the head's log-probabilities over the encoder states, the third
  stage that goldens and verify fingerprint after the features and the encoder.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UsageError
from .config import SpeechConfig
from .fastconformer.audio import AudioPreprocessor
from .fastconformer.encoder import ConformerEncoder
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class FrameWord:
    """A word (or segment) with NeMo's start and end offsets, in encoder frames from the start of its chunk,
    and, where NeMo reports seconds of its own (a forced alignment: rounded, punctuation snapped), those."""

    text: str
    start: int
    end: int
    start_seconds: float | None = None
    end_seconds: float | None = None


@dataclass(frozen=True)
class TimedText:
    """A word, segment or chunk with its start and end in seconds from the start of the audio."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class AlignedToken:
    """One token of an aligner's tokenisation of a whole transcript, aligned as one piece (NeMo's "char"
    timestamps, which its overlapping chunks are merged by): id, piece, the piece decoded alone, offsets in the
    aligner's frames from the start of its chunk, and NeMo's seconds (rounded to 2 decimals, punctuation snapped
    to the end of the token before it); -1 where the path skips it."""

    id: int
    piece: str
    text: str
    start: int
    end: int
    start_seconds: float
    end_seconds: float


@dataclass(frozen=True)
class Decoded:
    """One utterance's result from a head.

    `tokens`: the ids behind the text (NeMo's y_sequence for AED; the merged, blank-free ids for CTC).
    `ended`: decoding ended on its own (end-of-text), not on a length budget that cut the transcript short.
    `frames`: where the head places each token, in encoder frames (CTC: the frame that emits it); None when
    it does not know. `words`: timed words found apart from the tokens (canary-1b-v2's forced alignment);
    None when the head gives none (a canary2 flash model's words are read from its frame tokens instead).
    `aligned`: with a forced alignment, the whole text's aligner tokens (AlignedToken), and `encoded_frames`
    the length of the encoder's output: what NeMo merges overlapping chunks' times by.
    """

    tokens: list[int]
    ended: bool
    frames: list[int] | None = None
    words: list[FrameWord] | None = None
    aligned: list[AlignedToken] | None = None
    encoded_frames: int | None = None


@dataclass(frozen=True)
class AudioBatch:
    """A padded batch as the application hands it to a head: the features the model's preprocessor made
    and their frame counts, and the samples they came from (None where long-form inference built the
    features itself, NeMo's fixed-chunk path)."""

    features: mx.array  # (B, n_mels, T')
    frames: mx.array  # (B,)
    samples: mx.array | None = None  # (B, T)
    sample_counts: mx.array | None = None  # (B,)


BatchDecoder = Callable[[AudioBatch], list[Decoded]]


class SpeechModel(nn.Module):
    """NeMo's preprocessor and FastConformer encoder, and the head interface every family implements."""

    config_class: ClassVar[type[SpeechConfig]]
    # The model's stacks of repeated layers, by path (`owner.attribute`): run one layer at a time with its
    # weights copied in for the call when goldens and verify stream them (cpu/streaming.py).
    layer_stacks: ClassVar[tuple[str, ...]] = ("encoder.layers",)
    # Whether `canary-convert --parity` (parity.py) can compare this family with NeMo at conversion.
    nemo_parity: ClassVar[bool] = False

    def __init__(self, config: SpeechConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor = AudioPreprocessor(config.preprocessor)
        self.encoder = ConformerEncoder(config.encoder)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The float dtype the weights were stored in (quantized layers keep their scales in it too).

        Read off the first subsampling convolution, which is never quantized.
        """
        return self.encoder.pre_encode.conv[0].weight.dtype

    @property
    def nemo_long_form(self) -> str:
        """How NeMo's own transcribe() treats inputs longer than the window ("frames", "parallel" or "off":
        see app/longform.py); `chunking="nemo"` follows it."""
        return "off"

    def whole_input_risk(self, seconds: float, window: float) -> str | None:
        """What decoding `seconds` of audio in one piece risks when that is longer than the window (the
        transcript's warning), or None. Heads without prompts (CTC, transducers) read any length, as NeMo's
        transcribe() runs them whole; only full attention's cost grows with the square of the length."""
        if self.encoder.local_context is not None:
            return None
        return (f"{seconds:.1f} s is decoded in one piece with full attention, as NeMo's transcribe() does: its "
                f"memory and time grow with the square of the length; past {window:g} s NVIDIA's recipe is local "
                "attention (--attention local --context 128,128), or cut it with --chunking pauses")

    def preprocess(self, audio: Any, lengths: mx.array | np.ndarray | None = None) -> tuple[mx.array, mx.array]:
        """Audio -> log-mel features (B, n_mels, T') and frame counts, as NeMo's preprocessor computes them.

        `audio` is a (B, T) float32 batch with its sample counts `lengths` (B,) (without them every row
        counts whole), or what `transcribe` takes: a path, a 1-D numpy array at the model's
        rate, or a list of them (right-padded into one batch, not padded to a second as transcribe() pads
        short clips).
        """
        from .app.audio_io import load_audio
        from .app.clips import pad_batch
        from .app.transcribe import audio_items

        if lengths is None and (isinstance(audio, mx.array) or (isinstance(audio, np.ndarray) and audio.ndim == 2)):
            # A batch without lengths: every row is audio all the way.
            audio = mx.array(audio).reshape(-1, audio.shape[-1])
            lengths = mx.full((audio.shape[0],), audio.shape[1], dtype=mx.int32)
        if lengths is None:
            rate = self.config.preprocessor.sample_rate
            clips = [item if isinstance(item, np.ndarray) else load_audio(item, rate) for item in audio_items(audio)]
            batch, counts = pad_batch(clips)
            audio, lengths = mx.array(batch), mx.array(counts)
        return self.preprocessor(mx.array(audio), mx.array(lengths))

    def use_attention(self, attention: str, context: tuple[int, int] | None = None) -> None:
        """The encoder's self-attention: "full" (as trained) or "local" with (left, right) frames of context,
        NeMo's change_attention_model("rel_pos_local_attn", [left, right]) for long inputs (memory linear in
        the length; only equal contexts, see ConformerEncoder.use_local_attention)."""
        if attention == "full":
            if context is not None:
                raise UsageError("--context goes with --attention local")
            self.encoder.use_local_attention(None)
        elif attention == "local":
            if context is None:
                raise UsageError("--attention local needs --context LEFT,RIGHT (NVIDIA's recipe: 128,128)")
            try:
                self.encoder.use_local_attention(context)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        else:
            raise UsageError(f"--attention {attention!r}: choose full or local")

    def encode(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """Features (B, n_mels, T') -> encoder states (B, T'', d_model) and their lengths."""
        # Run the encoder in its weights' dtype (features are float32 whatever the weights are).
        return self.encoder(features.astype(self.compute_dtype), lengths)

    def attach(self, folder: Path) -> None:
        """Load what the folder keeps beside the weights for this family (canary-1b-v2: its aligner); called
        by load_model after the strict load. Nothing by default."""

    def attached(self) -> dict[str, SpeechModel]:
        """Models this one carries in subfolders of its folder, by subfolder (canary-1b-v2: `aligner`): the
        goldens record them and verify checks them as parts of the folder."""
        return {}

    def decode_text(self, ids: list[int]) -> str:
        """Token ids -> text as NeMo's decoding writes it for this head (the tokenizer's own decoding here)."""
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids)

    @abstractmethod
    def stage_logprobs(self, encoded: mx.array, enc_lengths: mx.array) -> mx.array:
        """The head's log-probabilities (B, L, V) for a batch of encoder states: what goldens and verify
        fingerprint as the third stage (AED: teacher-forced on fixed tokens; CTC: per frame)."""

    def golden_decoders(self) -> dict[str, BatchDecoder]:
        """The decoding modes whose tokens goldens record and verify checks, for a head without prompts
        (the Canary head's prompts and modes are goldens.py's own)."""
        return {}

    def transcribe_without_prompt(self, audio: Any, decode_batch: BatchDecoder, timestamps: bool, batch_size: int,
                                  chunking: str, chunk_seconds: float | None, progress: Any,
                                  unsupported: dict[str, Any]) -> list[Any]:
        """`transcribe` for a head without prompts (CTC, transducers): prompt or search options are refused by
        name, the rest goes to the application with the head's `decode_batch`."""
        from .app.longform import LongFormOptions
        from .app.transcribe import transcribe, warn

        if given := sorted(name for name, value in unsupported.items() if value is not None):
            raise UsageError(f"{self.config.family}: this model has no prompt or search options; it takes no "
                             f"{', '.join(given)}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with canary_convert.load_model(folder)")
        long_form = LongFormOptions(chunking=chunking, chunk_seconds=chunk_seconds)
        results = transcribe(self, self.tokenizer, audio, decode_batch, timestamps, batch_size, long_form, progress)
        warn(results)
        return results

    @abstractmethod
    def transcribe(self, audio: Any, **options: Any) -> list[Any]:
        """Paths or arrays (one or a list) -> one `app.transcribe.Transcript` each."""
