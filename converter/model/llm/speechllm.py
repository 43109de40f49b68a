"""The bundled speech-LLM (canary-qwen, NeMo's speechlm2 SALM) at inference: our front end and FastConformer,
the projection into the LLM's width, and the LLM itself run by mlx-lm.

SALM.generate formats the prompt in the LLM's chat format around the audio placeholder, embeds its tokens
(the placeholder's id replaced by 0 before the lookup), splices the projected audio frames in where the
placeholder stands, and lets the LLM generate from those embeddings: greedy, stopping at the tokenizer's end
of sequence. mlx-lm's generate_step takes the same spliced embeddings (`input_embeddings`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...errors import MissingExtraError, UsageError
from ..app.audio_io import load_audio
from ..app.clips import pad_batch
from ..app.transcribe import AudioInput, Chunk, Transcript, audio_items, item_name, warn
from ..cpu.widened import hold_widened, widen_products
from ..fastconformer.audio import AudioPreprocessor
from ..fastconformer.encoder import ConformerEncoder
from .config import SpeechLLMConfig

# NeMo's QwenPromptFormatter (collections/common/prompts/qwen.py): each turn is tokenized on its own.
_QWEN_USER_TURN = "<|im_start|>user\n{message}<|im_end|>\n"
_QWEN_ASSISTANT_PREFIX = "<|im_start|>assistant\n"


class AudioEncoder(nn.Module):
    """SALM's `perception`: log-mel front end -> FastConformer -> Linear to the LLM's hidden size (its
    modality adapter is the identity)."""

    def __init__(self, config: SpeechLLMConfig):
        super().__init__()
        self.preprocessor = AudioPreprocessor(config.preprocessor)
        self.encoder = ConformerEncoder(config.encoder)
        self.projection = nn.Linear(config.projection.input_size, config.projection.output_size)

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The stored float dtype, read off the first subsampling convolution (never quantized)."""
        return self.encoder.pre_encode.conv[0].weight.dtype

    def encode(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """(B, T) samples -> encoder states (B, T', d_model) and frame counts (features stay float32)."""
        features, feature_lengths = self.preprocessor(audio, lengths)
        return self.encoder(features.astype(self.compute_dtype), feature_lengths)

    def __call__(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """(B, T) samples -> audio embeddings (B, T', hidden) in the LLM's width, and their lengths."""
        encoded, lengths = self.encode(audio, lengths)
        return self.projection(encoded), lengths


@dataclass(frozen=True)
class Generated:
    """One generation: the new token ids (end of sequence excluded) and whether it ended on it."""

    tokens: list[int]
    ended: bool


class SpeechLLM:
    """Audio in, text out. `llm` and `tokenizer` are what `mlx_lm.load(folder/llm_folder)` returns."""

    def __init__(self, config: SpeechLLMConfig, audio: AudioEncoder, llm: nn.Module, tokenizer: Any):
        self.config = config
        self.audio = audio
        self.llm = llm
        self.tokenizer = tokenizer
        self.audio_token_id = tokenizer.convert_tokens_to_ids(config.audio_locator_tag)
        if self.audio_token_id is None or self.audio_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the LLM's tokenizer lacks the audio placeholder {config.audio_locator_tag}")

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """The chat-formatted prompt's ids, the placeholder among them once (NeMo's qwen prompt format)."""
        message = (prompt or self.config.generation.prompt).format(audio=self.config.audio_locator_tag)
        ids = [self._encode(_QWEN_USER_TURN.format(message=message)), self._encode(_QWEN_ASSISTANT_PREFIX)]
        flat = [token for part in ids for token in part]
        if flat.count(self.audio_token_id) != 1:
            raise ValueError(f"the prompt must hold the audio ({{audio}}) exactly once: {message!r}")
        return flat

    def _encode(self, text: str) -> list[int]:
        # NeMo's AutoTokenizer.text_to_ids: tokenize (special tokens whole), then look the pieces up.
        return list(self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text)))

    def embed(self, ids: Sequence[int], audio_embeddings: mx.array) -> mx.array:
        """The prompt's token embeddings with the audio frames (T', hidden) in place of the placeholder."""
        position = list(ids).index(self.audio_token_id)
        table = self.llm.model.embed_tokens
        before = table(mx.array(ids[:position]))
        after = table(mx.array(ids[position + 1:]))
        return mx.concatenate([before, audio_embeddings.astype(before.dtype), after], axis=0)

    def audio_embeddings(self, signals: Sequence[np.ndarray]) -> list[mx.array]:
        """Each signal's projected audio frames (T'_i, hidden), from one padded batch."""
        batch, counts = pad_batch(list(signals))
        embeddings, lengths = self.audio(mx.array(batch), mx.array(counts))
        return [embeddings[row, : int(length)] for row, length in enumerate(lengths.tolist())]

    def logits(self, embeddings: mx.array) -> mx.array:
        """The LLM's logits (L, vocab) for spliced input embeddings (L, hidden), no cache: the teacher-forced
        check against NeMo."""
        ids = mx.zeros((1, embeddings.shape[0]), dtype=mx.int32)  # unused: the embeddings stand in for them
        return self.llm(ids, input_embeddings=embeddings[None])[0]

    def generate(self, embeddings: mx.array, max_new_tokens: int | None = None) -> Generated:
        """Greedy generation from spliced embeddings, stopping at the tokenizer's end of sequence."""
        from mlx_lm.generate import generate_step

        budget = max_new_tokens or self.config.generation.max_new_tokens
        stop = {self.tokenizer.eos_token_id}  # NeMo's GenerationConfig: the tokenizer's EOS alone
        tokens: list[int] = []
        # The ids beside the embeddings only size the prompt: mlx-lm reads the embeddings.
        prompt = mx.zeros((embeddings.shape[0],), dtype=mx.int32)
        for token, _ in generate_step(prompt, self.llm, max_tokens=budget, input_embeddings=embeddings,
                                      sampler=lambda logprobs: mx.argmax(logprobs, axis=-1)):
            token = int(token)
            if token in stop:
                return Generated(tokens, True)
            tokens.append(token)
        return Generated(tokens, False)

    def transcribe_signal(self, signal: np.ndarray, prompt: str | None = None, max_new_tokens: int | None = None,
                          chunk_seconds: float | None = None) -> Iterator[tuple[float, float, Generated]]:
        """Equal windows of a signal, none longer than the chunk length (NeMo trained on up to 40 s), each
        generated on its own: (start s, end s, generation)."""
        rate = self.sample_rate
        seconds = chunk_seconds or self.config.generation.chunk_seconds
        if seconds <= 0:
            raise UsageError(f"chunk length {seconds} s: must be positive")
        window = int(seconds * rate)
        pieces = max(1, -(-len(signal) // window))
        bounds = np.linspace(0, len(signal), pieces + 1).astype(int)
        ids = self.prompt_ids(prompt)
        for start, end in zip(bounds[:-1], bounds[1:]):
            (frames,) = self.audio_embeddings([signal[start:end]])
            yield start / rate, end / rate, self.generate(self.embed(ids, frames), max_new_tokens)

    def transcribe(self, audio: AudioInput, prompt: str | None = None, max_new_tokens: int | None = None,
                   chunk_seconds: float | None = None) -> list[Transcript]:
        """Paths or 1-D arrays at the model's rate -> one Transcript each; long inputs go window by window,
        and a window the token budget cut is flagged (never dropped silently)."""
        results = []
        for index, item in enumerate(audio_items(audio)):
            name = item_name(item, index)
            signal = item if isinstance(item, np.ndarray) else load_audio(item, self.sample_rate)
            chunks = []
            for start, end, generated in self.transcribe_signal(np.asarray(signal, dtype=np.float32), prompt,
                                                                max_new_tokens, chunk_seconds):
                text = self.tokenizer.decode(generated.tokens, skip_special_tokens=True).strip()
                chunks.append(Chunk(start, end, text, generated.tokens, generated.ended))
            cut = [chunk for chunk in chunks if not chunk.ended]
            warnings = (f"{name}: generation reached the token budget before end of sequence in {len(cut)} of "
                        f"{len(chunks)} window(s); the transcript is cut short",) if cut else ()
            results.append(Transcript(
                source=name, text=" ".join(chunk.text for chunk in chunks if chunk.text),
                tokens=[token for chunk in chunks for token in chunk.tokens], seconds=len(signal) / self.sample_rate,
                chunks=tuple(chunks), truncated=bool(cut), warnings=warnings))
        warn(results)
        return results


def load_speech_llm(folder: Path, config: SpeechLLMConfig, weights: dict[str, mx.array]) -> SpeechLLM:
    """The audio half from our weights, the LLM from its folder through mlx-lm (its own loader, as users of
    mlx-lm load it)."""
    try:
        from mlx_lm import load as load_llm
    except ModuleNotFoundError:
        raise MissingExtraError(f"{folder}: a speech-LLM folder needs mlx-lm, which is not installed: "
                                "pip install 'canary-convert[llm]'") from None

    from ..quantized import quantize_modules

    audio = AudioEncoder(config)
    if config.quantization is not None:
        quantize_modules(audio, config.quantization, weights.keys())
    audio.load_weights(list(weights.items()), strict=True)
    audio.eval()
    llm, tokenizer = load_llm(str(folder / config.llm_folder))
    # On an x86 CPU MLX multiplies half-precision and quantized operands one element at a time: both halves'
    # products go through OpenBLAS in float32 instead (cpu/widened.py; the LLM's layers swapped in memory),
    # their half-precision weights widened once here where memory allows (a decoding step otherwise widens
    # every weight of the LLM again), with results identical to widening them at each call.
    for half in (llm, audio):  # the LLM first: its steps gain most
        widen_products(half)
        hold_widened(half)
    return SpeechLLM(config, audio, llm, tokenizer)
