"""NeMo's Transformer decoder (TransformerDecoderNM, pre-LN) in mlx-whisper's shape and naming.

The cache holds projected keys/values per block: NeMo caches each layer's input hidden states
instead, but keys and values are per-position functions of those states, so the results are equal.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..cpu.activations import attention
from ..config import DecoderConfig
from ..masks import additive_mask, valid_mask

# NeMo builds every decoder LayerNorm with eps=1e-5.
NORM_EPS = 1e-5


def cross_attention_mask(lengths: mx.array, frames: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(B, 1, 1, frames) additive mask hiding encoder frames past each utterance's length (NeMo's
    form_attention_mask adds (1 - mask) * -10000 to the scores)."""
    valid = valid_mask(lengths, frames)
    return additive_mask(valid[:, None, None, :], dtype)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, L, H) -> (B, heads, L, H / heads)."""
    b, length, _ = x.shape
    return x.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)


class KVCache:
    """Every block's keys/values for incremental decoding, in place of a concatenation per step.

    Self-attention keys/values live in (B, heads, capacity, d_head) buffers that grow `GROWTH` positions
    at a time and are written in place; cross-attention keys/values are projected once per utterance.
    `offset` is the number of positions already run.
    """

    GROWTH = 32  # positions: a beam search copies every row of its cache, capacity included, each step

    def __init__(self, cross: list[tuple[mx.array, mx.array]]):
        # Per block: (B, heads, T, d_head) keys and values of the encoder states (DecoderBlock.cross_kv).
        self.cross = cross
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
        self.offset = 0

    @property
    def frames(self) -> int:
        return self.cross[0][0].shape[2]

    def extend(self, block: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store one block's keys/values (B, heads, L, d_head) for positions offset..offset+L-1; return all
        positions so far. `advance` moves the offset once every block has been extended."""
        end = self.offset + keys.shape[2]
        if block == len(self.keys):
            self.keys.append(mx.zeros((*keys.shape[:2], 0, keys.shape[3]), dtype=keys.dtype))
            self.values.append(mx.zeros((*values.shape[:2], 0, values.shape[3]), dtype=values.dtype))
        if self.keys[block].shape[2] < end:
            self.keys[block] = self._grown(self.keys[block], end)
            self.values[block] = self._grown(self.values[block], end)
        self.keys[block][:, :, self.offset : end] = keys
        self.values[block][:, :, self.offset : end] = values
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]

    def _grown(self, buffer: mx.array, needed: int) -> mx.array:
        b, h, _, d = buffer.shape
        capacity = math.ceil(needed / self.GROWTH) * self.GROWTH
        extra = mx.zeros((b, h, capacity - buffer.shape[2], d), dtype=buffer.dtype)
        return mx.concatenate([buffer[:, :, : self.offset], extra], axis=2)

    def advance(self, length: int) -> None:
        self.offset += length

    def take_rows(self, self_rows: mx.array, cross_rows: mx.array | None = None) -> None:
        """Reorder (or repeat) the batch rows: self-attention by `self_rows`, cross-attention by `cross_rows`
        (unchanged when None). Beam search moves each hypothesis's history to its new slot this way."""
        self.keys = [mx.take(k, self_rows, axis=0) for k in self.keys]
        self.values = [mx.take(v, self_rows, axis=0) for v in self.values]
        if cross_rows is not None:
            self.cross = [(mx.take(k, cross_rows, axis=0), mx.take(v, cross_rows, axis=0)) for k, v in self.cross]


class MultiHeadAttention(nn.Module):
    """NeMo's transformer MultiHeadAttention: q and k are each divided by d_head**0.25 before q.k^T.

    That is the same as scaling q.k^T by 1/sqrt(d_head) once, which is what `attention` does.
    """

    def __init__(self, hidden_size: int, n_heads: int):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {n_heads}")
        self.n_heads = n_heads
        self.scale = (hidden_size // n_heads) ** -0.5
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values of `x` (B, L, H), split into heads: (B, heads, L, d_head) each."""
        return split_heads(self.key(x), self.n_heads), split_heads(self.value(x), self.n_heads)

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None) -> mx.array:
        """Queries from `x` (B, L, H) against keys/values (B, heads, S, d_head); mask additive, broadcast
        to (B, heads, L, S)."""
        b, length, hidden = x.shape
        q = split_heads(self.query(x), self.n_heads)
        out = attention(q, keys, values, self.scale, mask)
        return self.out(out.transpose(0, 2, 1, 3).reshape(b, length, hidden))


class DecoderBlock(nn.Module):
    """NeMo's pre-LN TransformerDecoderBlock: x += SA(LN1 x); x += XA(LN2 x, enc); x += FFN(LN3 x)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.attn_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.attn = MultiHeadAttention(hidden, heads)
        self.cross_attn_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.cross_attn = MultiHeadAttention(hidden, heads)
        self.mlp_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.mlp1 = nn.Linear(hidden, config.inner_size)
        self.mlp2 = nn.Linear(config.inner_size, hidden)
        # NeMo's PositionWiseFF knows relu and (exact, erf) gelu.
        if config.hidden_act == "relu":
            self.act = nn.relu
        elif config.hidden_act == "gelu":
            self.act = nn.gelu
        else:
            raise ValueError(f"unsupported decoder hidden_act={config.hidden_act!r}")

    def cross_kv(self, xa: mx.array) -> tuple[mx.array, mx.array]:
        """This block's cross-attention keys and values of the encoder states, projected once per utterance.

        Split into heads they are a strided view, which MLX's matmul would copy on every step; one
        contiguous copy made here makes a step's cross-attention about 8x cheaper (a third of a canary-1b
        step), and leaves the projection itself free to go.
        """
        keys, values = self.cross_attn.project_kv(xa)
        return mx.contiguous(keys), mx.contiguous(values)

    def __call__(
        self, x: mx.array, mask: mx.array | None, xa_mask: mx.array | None, cache: KVCache, index: int
    ) -> mx.array:
        """x (B, L, H) at the cache's offset; this block's keys/values go into `cache` at `index`."""
        h = self.attn_ln(x)
        keys, values = cache.extend(index, *self.attn.project_kv(h))
        x = x + self.attn(h, keys, values, mask)
        x = x + self.cross_attn(self.cross_attn_ln(x), *cache.cross[index], xa_mask)
        return x + self.mlp2(self.act(self.mlp1(self.mlp_ln(x))))


class TextDecoder(nn.Module):
    """Token ids + encoder states -> decoder hidden states, with an incremental KV cache.

    `positional_embedding` is NeMo's fixed sinusoidal table as stored in the checkpoint (already
    divided by sqrt(hidden) there); `output_bias` is the head's bias, whose weight NeMo ties to the
    token embedding.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if not config.pre_ln:
            raise ValueError("only NeMo's pre-LN transformer decoder (pre_ln: true) is implemented")
        hidden = config.hidden_size
        self.max_sequence_length = config.max_sequence_length
        self.token_embedding = nn.Embedding(config.vocab_size, hidden)
        self.positional_embedding = mx.zeros((config.max_sequence_length, hidden))
        self.embedding_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.blocks = [DecoderBlock(config) for _ in range(config.num_layers)]
        # NeMo adds final_layer_norm only for pre-LN with pre_ln_final_layer_norm.
        if config.pre_ln_final_layer_norm:
            self.ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.output_bias = mx.zeros((config.vocab_size,))

    def __call__(
        self,
        tokens: mx.array,
        xa: mx.array | None,
        xa_lengths: mx.array | None = None,
        kv_cache: KVCache | None = None,
        token_mask: mx.array | None = None,
    ) -> tuple[mx.array, KVCache]:
        """Run `tokens` (B, L) at positions offset..offset+L-1, offset = the cache's.

        xa: encoder states (B, T, H), needed when there is no cache yet (it then projects them once);
        xa_lengths: (B,) valid encoder frames, None = all valid;
        token_mask: optional (B, offset+L) boolean, False for pad keys (NeMo's decoder_mask), combined
        with the causal mask.
        Returns hidden states (B, L, H) after the final LayerNorm, and the cache, extended by L positions.
        """
        if kv_cache is None:
            if xa is None:
                raise ValueError("the first decoder call needs the encoder states")
            kv_cache = KVCache([block.cross_kv(xa) for block in self.blocks])
        offset = kv_cache.offset
        length = tokens.shape[1]
        if offset + length > self.max_sequence_length:
            raise ValueError(
                f"decoder positions reach {offset + length}, past max_sequence_length {self.max_sequence_length}"
            )
        # NeMo: token embedding + position embedding, then LayerNorm (no sqrt(H) scaling).
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + length]
        x = self.embedding_ln(x)

        mask = None
        if length > 1 or token_mask is not None:
            # NeMo's causal mask (tril, diagonal 0), shifted by the cached positions.
            keys = mx.arange(offset + length)[None, :]
            visible = keys <= (mx.arange(length)[:, None] + offset)
            visible = visible[None, None]
            if token_mask is not None:
                visible = visible & token_mask[:, None, None, :]
            mask = additive_mask(visible, x.dtype)
        xa_mask = None if xa_lengths is None else cross_attention_mask(xa_lengths, kv_cache.frames, x.dtype)

        for index, block in enumerate(self.blocks):
            x = block(x, mask, xa_mask, kv_cache, index)
        kv_cache.advance(length)
        if "ln" in self:
            x = self.ln(x)
        return x, kv_cache

    def logprobs(self, hidden: mx.array) -> mx.array:
        """NeMo's TokenClassifier head: tied-weight linear plus bias, then log_softmax (in float32)."""
        logits = self.token_embedding.as_linear(hidden) + self.output_bias
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
