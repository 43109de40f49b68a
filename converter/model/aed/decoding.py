"""NeMo 3.0's AED decoding (greedy and beam search) on the bundled MLX model, token for token.

The functions mirror `GreedySequenceGenerator` and `BeamSearchSequenceGenerator`
(nemo/collections/asr/modules/transformer/transformer_generators.py) as wrapped by
`TransformerAEDGreedyInfer` / `TransformerAEDBeamInfer` (multitask_{greedy,beam}_decoding.py), including
their quirks, so that results can be compared with NeMo's `Hypothesis.y_sequence` one to one:

* the result holds the generated tokens only: NeMo cuts the (padded) prompt off the front and then every
  trailing EOS or pad token off the end (`format_hypotheses`); a pad or EOS in the middle stays;
* the length budget is `min(max_sequence_length, T + max_generation_delta)` minus the padded prompt
  length, where T is the *padded* encoder length of the whole batch (not each utterance's), and a
  negative delta means `max_sequence_length` alone. Greedy generates at most that many tokens, beam search
  one more (it takes a first step before its loop);
* greedy stops a row only at EOS (a generated pad is kept and fed back); beam search treats a hypothesis
  ending in EOS *or* pad as finished, but not right after the first step;
* prompts of different lengths are right-padded with the pad id (lhotse's `collate_vectors`, as NeMo's
  prompted dataset does); every row continues at position = padded prompt length. Pad keys are hidden
  only while the prompt itself is run; later steps see them (NeMo's step mask covers just the new token);
* with several utterances and beam_size > 1, NeMo repeats the prompt's decoder cache tile-wise
  (torch `repeat`: u0, u1, .., u0, u1, ..) while hypotheses and encoder states are laid out utterance by
  utterance, so a hypothesis attends to another utterance's prompt states. `tile_prompt_cache=True`
  reproduces that; False gives what decoding each utterance alone gives.

Exact ties between scores are broken towards the lower index here; torch.topk leaves their order
unspecified, so only exactly tied candidates could ever be ordered differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from ..config import DecodingConfig
from ..speech import Decoded
from .decoder import KVCache

if TYPE_CHECKING:  # canary.py imports the transcription path, which imports this module
    from .canary import CanaryModel

# NeMo's decoding strategies (MultiTaskDecoding.change_strategy); greedy_batch runs the same greedy search.
STRATEGIES = ("greedy", "greedy_batch", "beam")
# transformer_utils.NEG_INF: beam search scales the extra candidates of a finished hypothesis by (1 - NEG_INF).
NEG_INF = -10000.0


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; defaults are NeMo's MultiTaskDecodingConfig (beam search, beam_size 1).

    `length_penalty` is NeMo's `beam.length_penalty` (the `len_pen` key found in checkpoint configs is never
    read). NeMo keeps a length budget per strategy: `beam.max_generation_delta` here is
    `max_generation_delta`, `greedy.max_generation_delta` is `greedy_max_generation_delta` (None: the same
    value); a negative delta means "up to the decoder's max_sequence_length". `tile_prompt_cache` is not a
    NeMo setting: True reproduces NeMo's batched beam search (see the module docstring), False makes each
    utterance's result independent of the rest of the batch.
    """

    strategy: str = "beam"
    beam_size: int = 1
    length_penalty: float = 0.0
    max_generation_delta: int = -1
    greedy_max_generation_delta: int | None = None
    tile_prompt_cache: bool = True
    max_new_tokens: int | None = None  # not a NeMo setting: a cap below NeMo's budget (golden outputs use it)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")

    @property
    def is_greedy(self) -> bool:
        return self.strategy in ("greedy", "greedy_batch")

    @property
    def generation_delta(self) -> int:
        """The max_generation_delta NeMo's chosen strategy reads (its own config section's)."""
        if self.is_greedy and self.greedy_max_generation_delta is not None:
            return self.greedy_max_generation_delta
        return self.max_generation_delta

    @classmethod
    def from_config(cls, config: DecodingConfig) -> DecodingOptions:
        """The checkpoint's own decoding defaults, as recorded in the MLX folder's config.json."""
        return cls(config.strategy, config.beam_size, config.length_penalty, config.max_generation_delta,
                   config.greedy_max_generation_delta)


def pad_prompts(prompts: list[list[int]], pad_id: int) -> mx.array:
    """Right-pad prompts to one length with the pad id, as NeMo's dataloader batches them."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("every utterance needs a non-empty prompt")
    width = max(len(prompt) for prompt in prompts)
    return mx.array([list(prompt) + [pad_id] * (width - len(prompt)) for prompt in prompts], dtype=mx.int32)


def max_generation_length(max_sequence_length: int, frames: int, prompt_length: int, max_generation_delta: int,
                          max_new_tokens: int | None = None) -> int:
    """NeMo's `_prepare_for_search` budget: the loop count of greedy search (beam search adds one step),
    capped at `max_new_tokens` generated tokens when given."""
    limit = max_sequence_length
    if max_generation_delta >= 0:
        # frames is the batch's padded encoder length: NeMo reads encoder_hidden_states.size(1).
        limit = min(max_sequence_length, frames + max_generation_delta)
    budget = limit - prompt_length
    return budget if max_new_tokens is None else min(budget, max_new_tokens)


def length_penalty_factor(lengths: mx.array, alpha: float) -> mx.array:
    """GNMT's ((5 + len) / 6) ** alpha in float32, as BeamSearchSequenceGenerator.compute_len_penalty.

    torch's pow special-cases some exponents (fill, copy, sqrt, 1/sqrt, reciprocal, x*x, x*x*x, 1/(x*x));
    using the same operations keeps those penalties bit-identical. Other exponents go through a general
    pow that may differ from torch's in the last bit (torch's own scalar and vector paths differ too).
    """
    base = (5.0 + lengths.astype(mx.float32)) / 6.0
    special = {
        0.0: lambda x: mx.ones_like(x),
        1.0: lambda x: x,
        0.5: mx.sqrt,
        -0.5: lambda x: 1.0 / mx.sqrt(x),
        -1.0: lambda x: 1.0 / x,
        2.0: lambda x: x * x,
        3.0: lambda x: x * x * x,
        -2.0: lambda x: 1.0 / (x * x),
    }
    if alpha in special:
        return special[alpha](base)
    return mx.power(base, mx.array(alpha, dtype=mx.float32))


def strip_hypothesis(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Drop the trailing run of EOS/pad tokens, as NeMo's format_hypotheses does (inner ones stay)."""
    end = len(tokens)
    while end and tokens[end - 1] in (eos_id, pad_id):
        end -= 1
    return tokens[:end]


def _top_k(values: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """torch.topk(sorted=True) along the last axis: the k largest values, best first, and their indices."""
    # mx.topk does not sort its result; a stable argsort of the negated values does (ties: lower index first).
    order = mx.argsort(-values, axis=-1)[..., :k]
    return mx.take_along_axis(values, order, axis=-1), order


def _logits(model: CanaryModel, hidden: mx.array) -> mx.array:
    """Raw head output in float32: NeMo's greedy search takes argmax of logits, not of log-probabilities."""
    decoder = model.decoder
    return (decoder.token_embedding.as_linear(hidden) + decoder.output_bias).astype(mx.float32)


def _step_mask(tokens: mx.array, offset: int, pad_id: int) -> mx.array:
    """The key mask of a one-token step: NeMo masks *all* keys (-10000) of a row whose new token is pad."""
    # NeMo builds the step's decoder mask from that one token (mask_padded_tokens) and broadcasts it over
    # every cached key; the other rows get an all-visible mask, which adds exactly 0 to their scores.
    keep = tokens[:, 0] != pad_id
    return mx.broadcast_to(keep[:, None], (tokens.shape[0], offset + 1))


def _run_prompt(
    model: CanaryModel, prompt: mx.array, encoded: mx.array, enc_lengths: mx.array, pad_id: int
) -> tuple[mx.array, KVCache]:
    """Run the whole padded prompt once (pad keys hidden); returns the last position's hidden state."""
    hidden, cache = model.decode(prompt, encoded, enc_lengths, kv_cache=None, token_mask=prompt != pad_id)
    # NeMo scores the next token from the last column, a pad for rows with a shorter prompt.
    return hidden[:, -1], cache


def _check_batch(encoded: mx.array, enc_lengths: mx.array, prompts: list[list[int]]) -> None:
    if encoded.ndim != 3 or enc_lengths.shape != (encoded.shape[0],) or len(prompts) != encoded.shape[0]:
        raise ValueError(
            f"need encoder states (B, T, H), lengths (B,) and B prompts; got {tuple(encoded.shape)}, "
            f"{tuple(enc_lengths.shape)} and {len(prompts)} prompts"
        )


def decode_greedy(
    model: CanaryModel,
    encoded: mx.array,
    enc_lengths: mx.array,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    max_generation_delta: int = -1,
    max_new_tokens: int | None = None,
) -> list[Decoded]:
    """NeMo's greedy search (TransformerAEDGreedyInfer, no sampling): per utterance, NeMo's y_sequence.

    encoded: decoder-width encoder states (B, T, H) as `CanaryModel.encode` returns them; enc_lengths (B,).
    """
    _check_batch(encoded, enc_lengths, prompts)
    prompt = pad_prompts(prompts, pad_id)
    batch, prompt_length = prompt.shape
    budget = max_generation_length(
        model.decoder.max_sequence_length, encoded.shape[1], prompt_length, max_generation_delta, max_new_tokens
    )
    if budget <= 0:
        # NeMo runs no step at all then (and its format_hypotheses fails on the empty result).
        return [Decoded([], False) for _ in range(batch)]

    enc_lengths = enc_lengths.astype(mx.int32)
    hidden, cache = _run_prompt(model, prompt, encoded, enc_lengths, pad_id)
    finished = mx.zeros((batch,), dtype=mx.bool_)
    generated: list[mx.array] = []
    for step in range(budget):
        if step:
            tokens = generated[-1][:, None]
            offset = prompt_length + step - 1
            out, cache = model.decode(tokens, None, enc_lengths, cache, _step_mask(tokens, offset, pad_id))
            hidden = out[:, -1]
        best = mx.argmax(_logits(model, hidden), axis=-1).astype(mx.int32)
        # After EOS a row only emits pad (NeMo's pad_profile); only EOS ends a row, a generated pad does not.
        best = mx.where(finished, pad_id, best)
        previous, finished = finished, finished | (best == eos_id)
        generated.append(best)
        # Start this step, then read the previous step's flags while it runs: the one host round trip per
        # token. Once every row had finished, this step only appended pads, which NeMo's result drops too.
        mx.async_eval(best, finished)
        if step and bool(mx.all(previous).item()):
            break
    rows = mx.stack(generated, axis=1).tolist()
    # A row ended on EOS exactly when it holds one (greedy stops a row only there).
    return [Decoded(strip_hypothesis(row, eos_id, pad_id), eos_id in row) for row in rows]


def decode_beam(
    model: CanaryModel,
    encoded: mx.array,
    enc_lengths: mx.array,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    max_generation_delta: int = -1,
    beam_size: int = 1,
    length_penalty: float = 0.0,
    tile_prompt_cache: bool = True,
    max_new_tokens: int | None = None,
) -> list[Decoded]:
    """NeMo's beam search (TransformerAEDBeamInfer, best hypothesis): per utterance, NeMo's y_sequence.

    `tile_prompt_cache` mirrors NeMo's cross-utterance cache layout (see the module docstring); it only
    matters with several utterances and beam_size > 1.
    """
    _check_batch(encoded, enc_lengths, prompts)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    k = beam_size
    prompt = pad_prompts(prompts, pad_id)
    batch, prompt_length = prompt.shape
    rows = batch * k
    # Beam search takes its first step before the loop: a cap of N tokens leaves N - 1 loop steps.
    budget = max_generation_length(
        model.decoder.max_sequence_length, encoded.shape[1], prompt_length, max_generation_delta,
        None if max_new_tokens is None else max_new_tokens - 1,
    )
    enc_lengths = enc_lengths.astype(mx.int32)

    # First step, before NeMo's loop: the prompt once per utterance, then the k best first tokens.
    hidden, cache = _run_prompt(model, prompt, encoded, enc_lengths, pad_id)
    scores, first = _top_k(model.logprobs(hidden), k)  # (B, k) each
    scores = scores.reshape(rows, 1)
    # Hypotheses are laid out utterance by utterance: row = utterance * k + rank.
    prefixes = mx.concatenate([mx.repeat(prompt, k, axis=0), first.reshape(rows, 1).astype(mx.int32)], axis=1)
    enc_lengths = mx.repeat(enc_lengths, k, axis=0)
    # NeMo: decoder_mems_list[j].repeat(beam_size, 1, 1) tiles the self-attention cache, while the encoder
    # states are repeated per utterance (repeat(1, beam, 1).view(...)), so cross-attention is never tiled.
    per_utterance = mx.repeat(mx.arange(batch), k)
    cache.take_rows(mx.tile(mx.arange(batch), k) if tile_prompt_cache else per_utterance, per_utterance)
    # NeMo starts with no hypothesis finished, even one whose first token is EOS or pad, and with length
    # prefix length + 1 for all.
    finished = mx.zeros((rows,), dtype=mx.bool_)
    lengths = mx.full((rows, 1), prefixes.shape[1] + 1, dtype=mx.float32)
    first_column = mx.arange(k)[None, :] == 0
    utterance_base = mx.repeat(mx.arange(batch) * k, k)  # first row of each row's utterance

    for position in range(prompt_length, prompt_length + budget):
        tokens = prefixes[:, -1:]
        out, cache = model.decode(tokens, None, enc_lengths, cache, _step_mask(tokens, position, pad_id))
        step_scores, step_tokens = _top_k(model.logprobs(out[:, -1]), k)  # (rows, k)
        # A finished hypothesis extends only with pad; its first candidate keeps its score (x * 0), the
        # others are pushed out of the beam (x * (1 - NEG_INF)).
        step_tokens = mx.where(finished[:, None], pad_id, step_tokens.astype(mx.int32))
        factor = mx.where(finished[:, None], mx.where(first_column, 0.0, 1.0 - NEG_INF), 1.0)
        candidates = scores + step_scores * factor.astype(mx.float32)
        penalty = length_penalty_factor(lengths, length_penalty)
        candidates = (candidates / penalty).reshape(batch, k * k)
        best, chosen = _top_k(candidates, k)  # (B, k); candidate = parent rank * k + its own rank
        # NeMo multiplies the ranked scores back by the penalties of the *old* rows in the same slots.
        scores = best.reshape(rows, 1) * penalty
        chosen = chosen.reshape(rows).astype(mx.int32)
        parents = utterance_base + chosen // k
        new_tokens = mx.take_along_axis(step_tokens.reshape(batch, k * k), chosen.reshape(batch, k), axis=1)
        prefixes = mx.concatenate([mx.take(prefixes, parents, axis=0), new_tokens.reshape(rows, 1)], axis=1)
        # Cross-attention keys/values are the same for every row of an utterance: only self-attention moves.
        cache.take_rows(parents)
        # Length = 1 + tokens that are neither EOS nor pad over the whole row, prompt included.
        real = (prefixes != eos_id) & (prefixes != pad_id)
        lengths = (1 + real.sum(axis=1, keepdims=True)).astype(mx.float32)
        finished = ~real[:, -1]
        if bool(mx.all(finished).item()):
            break

    final = (scores / length_penalty_factor(lengths, length_penalty)).reshape(batch, k)
    winners = mx.arange(batch) * k + mx.argmax(final, axis=1).astype(mx.int32)  # first best on ties
    best_rows = mx.take(prefixes, winners, axis=0)[:, prompt_length:].tolist()
    # Beam search finishes a hypothesis on EOS or pad; one that ends on anything else ran out of budget.
    return [Decoded(strip_hypothesis(row, eos_id, pad_id), bool(row) and row[-1] in (eos_id, pad_id))
            for row in best_rows]


def decode(
    model: CanaryModel,
    encoded: mx.array,
    enc_lengths: mx.array,
    prompts: list[list[int]],
    options: DecodingOptions,
    eos_id: int,
    pad_id: int,
) -> list[Decoded]:
    """Decode a batch with NeMo's strategy named in `options`; per utterance, NeMo's y_sequence."""
    if options.is_greedy:
        return decode_greedy(model, encoded, enc_lengths, prompts, eos_id, pad_id, options.generation_delta,
                             options.max_new_tokens)
    return decode_beam(
        model, encoded, enc_lengths, prompts, eos_id, pad_id, options.generation_delta,
        options.beam_size, options.length_penalty, options.tile_prompt_cache, options.max_new_tokens,
    )
