"""The bundled MLX Canary model: NeMo's EncDecMultiTaskModel at inference, built from `config.json`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...errors import UsageError
from ..config import ModelConfig
from ..ctc.align import TimestampAligner
from ..ctc.model import CTCModel
from ..speech import AudioBatch, BatchDecoder, Decoded, SpeechModel
from .decoder import KVCache, TextDecoder
from .decoding import DecodingOptions, decode as decode_search
from ..masks import valid_mask
from .prompts import FLAGS, PromptOptions, build_prompt, default_slots
from .timestamps import has_frame_tokens
from ..tokenizer import Tokenizer
from ..app.longform import LongFormOptions
from ..app.transcribe import AudioInput, FileProgress, Transcript, transcribe, warn

# Where a canary-1b-v2 folder keeps its timestamp aligner (a CTC model folder of its own).
ALIGNER_FOLDER = "aligner"
# Teacher-forced log-probabilities (parity, goldens) score the BOS token then this many fixed text tokens.
TEACHER_FORCED_TOKENS = 20


def teacher_forced_tokens(vocab_size: int, batch: int, prompt: list[int]) -> np.ndarray:
    """The prompt followed by fixed pseudo-random text tokens, the same for every run."""
    rng = np.random.default_rng(7)
    text = rng.integers(0, vocab_size, size=(batch, TEACHER_FORCED_TOKENS))
    return np.concatenate([np.tile(np.array(prompt, dtype=np.int64), (batch, 1)), text], axis=1)


class CanaryModel(SpeechModel):
    """preprocessor -> FastConformer encoder -> (optional width projection) -> Transformer decoder.

    Every parameter's shape comes from `config`, so the parameter tree is exactly the set of names the
    mapping (mappings/canary.yaml) produces for the checkpoint the config was derived from.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    layer_stacks: ClassVar[tuple[str, ...]] = ("encoder.layers", "decoder.blocks")
    nemo_parity: ClassVar[bool] = True
    config: ModelConfig

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__(config, tokenizer)
        # NeMo uses nn.Identity when encoder and decoder widths agree: no parameter at all then.
        if config.encoder_decoder_proj:
            self.encoder_decoder_proj = nn.Linear(config.encoder.d_model, config.decoder.hidden_size)
        self.decoder = TextDecoder(config.decoder)
        # canary-1b-v2's timestamp model (folder's aligner/), attached by `attach`; not part of the tree.
        self.aligner: TimestampAligner | None = None

    def attach(self, folder: Path) -> None:
        """Load the aligner a canary-1b-v2 folder carries in `aligner/` (load.py calls this after the weights)."""
        from ..load import CONFIG_FILE, load_model

        if self.config.timestamps_asr_model and (folder / ALIGNER_FOLDER / CONFIG_FILE).is_file():
            aligner = load_model(folder / ALIGNER_FOLDER)
            if not isinstance(aligner, CTCModel):
                raise ValueError(f"{folder / ALIGNER_FOLDER}: the timestamp aligner is a {aligner.config.family} model, not CTC")
            self.aligner = TimestampAligner(aligner)

    @property
    def nemo_long_form(self) -> str:
        # NeMo's transcribe() chunks by itself (overlapping chunks) only when the checkpoint restored a
        # timestamps model; otherwise FrameBatchMultiTaskAED's fixed chunks are its long-audio path.
        return "parallel" if self.config.timestamps_asr_model else "frames"

    def whole_input_risk(self, seconds: float, window: float) -> str | None:
        # An autoregressive decoder over a window longer than its training clips: NeMo's own output stops early.
        return (f"{seconds:.1f} s is longer than the {window:g} s window and chunking is off: the model may stop "
                "early or lose words")

    def attached(self) -> dict[str, SpeechModel]:
        return {ALIGNER_FOLDER: self.aligner.model} if self.aligner is not None else {}

    def encode(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """Features (B, n_mels, T') -> encoder states (B, T'', H_dec) in the decoder's width, and their lengths."""
        x, lengths = super().encode(features, lengths)
        if "encoder_decoder_proj" in self:
            x = self.encoder_decoder_proj(x)
        return x, lengths

    def stage_logprobs(self, encoded: mx.array, enc_lengths: mx.array) -> mx.array:
        """Teacher-forced log-probabilities on the BOS token then fixed pseudo-random tokens."""
        assert self.tokenizer is not None
        tokens = teacher_forced_tokens(self.tokenizer.vocab_size, encoded.shape[0], [self.tokenizer.bos_id])
        return self.decoder_logprobs(mx.array(tokens), encoded, enc_lengths)

    def decode(
        self,
        tokens: mx.array,
        encoded: mx.array | None,
        enc_lengths: mx.array | None = None,
        kv_cache: KVCache | None = None,
        token_mask: mx.array | None = None,
    ) -> tuple[mx.array, KVCache]:
        """One decoder call (prompt or incremental step): hidden states (B, L, H) and the updated cache.

        Feed the result (or its last position) to `logprobs`.
        """
        return self.decoder(tokens, encoded, enc_lengths, kv_cache=kv_cache, token_mask=token_mask)

    def logprobs(self, hidden: mx.array) -> mx.array:
        """Decoder hidden states (..., H) -> log-probabilities over the (padded) vocabulary (..., V)."""
        return self.decoder.logprobs(hidden)

    def decoder_logprobs(
        self,
        token_ids: mx.array,
        encoded: mx.array,
        enc_lengths: mx.array,
        token_lengths: mx.array | None = None,
    ) -> mx.array:
        """Teacher-forced log-probabilities (B, L, V) for every position of `token_ids` (B, L).

        `token_lengths` (B,) optionally marks right padding as NeMo's decoder_mask does; without it every
        token is attended (the causal mask alone already keeps padding out of earlier positions).
        """
        token_mask = None
        if token_lengths is not None:
            token_mask = valid_mask(token_lengths, token_ids.shape[1])
        hidden, _ = self.decoder(token_ids, encoded, enc_lengths, token_mask=token_mask)
        return self.decoder.logprobs(hidden)

    def prompt_options(self, source_lang: str | None = None, target_lang: str | None = None, task: str | None = None,
                       **flags: bool | None) -> PromptOptions:
        """The prompt for what the caller asks, the rest from the checkpoint's `prompt_defaults` (see transcribe)."""
        assert self.tokenizer is not None
        defaults = default_slots(self.config.prompt_defaults)
        source = source_lang or str(defaults.get("source_lang") or self.tokenizer.languages[0])
        target = target_lang or (source if source_lang else str(defaults.get("target_lang") or source))
        chosen = {name: value for name, value in flags.items() if value is not None}
        options = {**{name: defaults[name] for name in FLAGS if name in defaults}, **chosen}
        return PromptOptions(source_lang=source, target_lang=target,
                             task=task or ("transcribe" if target == source else "translate"), **options)

    def transcribe(
        self,
        audio: AudioInput,
        source_lang: str | None = None,
        target_lang: str | None = None,
        task: str | None = None,
        pnc: bool | None = None,
        itn: bool | None = None,
        timestamp: bool | None = None,
        diarize: bool | None = None,
        strategy: str | None = None,
        beam_size: int | None = None,
        length_penalty: float | None = None,
        batch_size: int = 4,
        chunking: str = "nemo",
        chunk_seconds: float | None = None,
        progress: FileProgress | None = None,
    ) -> list[Transcript]:
        """Paths or 16 kHz float32 arrays (one or a list) -> one Transcript each, with `.text` and `.tokens`.

        What is left out comes from the checkpoint's `prompt_defaults` (NeMo's own defaults), else: the
        tokenizer's first language, target = source (a source given alone means "in that language"), task from
        the two languages, punctuation on, itn/timestamp/diarize off. `task` is transcribe/translate or NeMo's
        manifest names (asr, ast, s2t_translation). Decoding defaults
        come from the checkpoint (NeMo's: beam search of size 1). `timestamp` asks a canary2 model for its
        frame tokens (word and segment times). Inputs longer than the window are chunked by `chunking`
        ("nemo", "pauses" or "off", see LongFormOptions); `progress(name, done, total)` hears of each chunk.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with canary_convert.load_model(folder)")
        prompt = self.prompt_options(source_lang, target_lang, task, pnc=pnc, itn=itn, timestamp=timestamp,
                                     diarize=diarize)
        decoding = self.decoding_options(strategy, beam_size, length_penalty)
        long_form = LongFormOptions(chunking=chunking, chunk_seconds=chunk_seconds)
        aligner = self.aligner if prompt.timestamp else None
        results = transcribe(self, self.tokenizer, audio, self.batch_decoder(prompt, decoding), bool(prompt.timestamp),
                             batch_size, long_form, progress, aligner)
        warn(results)
        return results

    def decoding_options(self, strategy: str | None = None, beam_size: int | None = None,
                         length_penalty: float | None = None) -> DecodingOptions:
        """The checkpoint's decoding defaults, with whatever the caller overrides (a bad value is a usage error)."""
        overrides = {name: value for name, value in
                     (("strategy", strategy), ("beam_size", beam_size), ("length_penalty", length_penalty))
                     if value is not None}
        try:
            return replace(DecodingOptions.from_config(self.config.decoding), **overrides)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def batch_decoder(self, prompt: PromptOptions, decoding: DecodingOptions) -> BatchDecoder:
        """Encode a batch and search it with one prompt for every row (NeMo's transcribe() batches)."""
        assert self.tokenizer is not None
        tokenizer = self.tokenizer
        aligner = self._timestamp_aligner() if prompt.timestamp else None
        if aligner is not None:
            # NeMo's transcribe() asks the Canary for no frame tokens when its aligner gives the times.
            prompt = replace(prompt, timestamp=False)
        prompt_ids = build_prompt(self.config.prompt_format, tokenizer, prompt)

        def decode_batch(batch: AudioBatch) -> list[Decoded]:
            encoded, enc_lengths = self.encode(batch.features, batch.frames)
            decoded = decode_search(self, encoded, enc_lengths, [prompt_ids] * batch.features.shape[0], decoding,
                                    tokenizer.eos_id, tokenizer.pad_id)
            if aligner is None:
                return decoded
            if batch.samples is None or batch.sample_counts is None:
                raise UsageError("the timestamp aligner needs the audio of each chunk; use chunking 'nemo' or 'pauses'")
            # NeMo aligns each hypothesis' text (the tokens the tokenizer knows, decoded) to the same audio.
            texts = [tokenizer.decode([token for token in result.tokens if token < tokenizer.vocab_size])
                     for result in decoded]
            aligned, tokens = aligner.align_both(batch.samples, batch.sample_counts, texts)
            return [replace(result, words=words, aligned=whole, encoded_frames=int(frames))
                    for result, (words, _), whole, frames in zip(decoded, aligned, tokens, enc_lengths.tolist())]

        return decode_batch

    def _timestamp_aligner(self) -> TimestampAligner | None:
        """The aligner that gives this checkpoint's timestamps (None: it writes frame tokens itself)."""
        assert self.tokenizer is not None
        if self.config.timestamps_asr_model:
            if self.aligner is None:
                raise UsageError(
                    f"{self.config.family}: NeMo takes this checkpoint's timestamps from its CTC timestamp model, "
                    "which this folder lacks (converted by an older canary-convert): convert it again to get aligner/"
                )
            return self.aligner
        if not has_frame_tokens(self.tokenizer):
            raise UsageError("this checkpoint's tokenizer has no frame tokens (<|0|>, <|1|>, ...): it cannot emit "
                             "timestamps")
        return None
