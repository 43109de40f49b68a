"""The bundled MLX Canary model: NeMo's EncDecMultiTaskModel at inference, built from `config.json`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..fastconformer.audio import AudioPreprocessor
from ..config import ModelConfig
from .decoder import KVCache, TextDecoder
from ..fastconformer.encoder import ConformerEncoder
from ..masks import valid_mask
from .prompts import FLAGS, PromptOptions, default_slots
from ..tokenizer import Tokenizer
from ..app.audio_io import load_audio
from ..app.clips import pad_batch
from ..app.longform import LongFormOptions
from ..app.transcribe import AudioInput, FileProgress, Transcript, audio_items, decoding_options, transcribe, warn


class CanaryModel(nn.Module):
    """preprocessor -> FastConformer encoder -> (optional width projection) -> Transformer decoder.

    Every parameter's shape comes from `config`, so the parameter tree is exactly the set of names the
    mapping (mappings/canary.yaml) produces for the checkpoint the config was derived from.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor = AudioPreprocessor(config.preprocessor)
        self.encoder = ConformerEncoder(config.encoder)
        # NeMo uses nn.Identity when encoder and decoder widths agree: no parameter at all then.
        if config.encoder_decoder_proj:
            self.encoder_decoder_proj = nn.Linear(config.encoder.d_model, config.decoder.hidden_size)
        self.decoder = TextDecoder(config.decoder)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The float dtype the weights were stored in (quantized layers keep their scales in it too).

        Read off the first subsampling convolution, which is never quantized.
        """
        return self.encoder.pre_encode.conv[0].weight.dtype

    def preprocess(self, audio: AudioInput | mx.array, lengths: mx.array | np.ndarray | None = None) -> tuple[mx.array, mx.array]:
        """Audio -> log-mel features (B, n_mels, T') and frame counts, as NeMo's preprocessor computes them.

        `audio` is a (B, T) float32 batch with its sample counts `lengths` (B,) (without them every row
        counts whole), or what `transcribe` takes: a path, a 1-D numpy array at the model's
        rate, or a list of them (right-padded into one batch, not padded to a second as transcribe() pads
        short clips).
        """
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

    def encode(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """Features (B, n_mels, T') -> encoder states (B, T'', H_dec) in the decoder's width, and their lengths."""
        # Run the encoder in its weights' dtype (features are float32 whatever the weights are).
        features = features.astype(self.compute_dtype)
        x, lengths = self.encoder(features, lengths)
        if "encoder_decoder_proj" in self:
            x = self.encoder_decoder_proj(x)
        return x, lengths

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
        decoding = decoding_options(self, strategy, beam_size, length_penalty)
        long_form = LongFormOptions(chunking=chunking, chunk_seconds=chunk_seconds)
        results = transcribe(self, self.tokenizer, audio, prompt, decoding, batch_size, long_form, progress)
        warn(results)
        return results
