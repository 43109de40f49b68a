"""NeMo's Transformer decoder (TransformerDecoderNM, pre-LN) in mlx-whisper's shape and naming.

The KV cache holds projected keys/values per block: NeMo caches each layer's input hidden states
instead, but keys and values are per-position functions of those states, so the results are equal.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import DecoderConfig
from .masks import valid_mask

# NeMo's form_attention_mask adds (1 - mask) * -10000 to the scores (NEG_INF in transformer_utils).
MASK_VALUE = -10000.0
# NeMo builds every decoder LayerNorm with eps=1e-5.
NORM_EPS = 1e-5

KVCache = list[tuple[tuple[mx.array, mx.array], tuple[mx.array, mx.array]]]


def additive_mask(valid: mx.array, dtype: mx.Dtype) -> mx.array:
    """Boolean "may attend" -> NeMo's additive form: 0 where allowed, -10000 where not."""
    return mx.where(valid, mx.array(0.0, dtype=dtype), mx.array(MASK_VALUE, dtype=dtype))


def cross_attention_mask(lengths: mx.array, frames: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(B, 1, 1, frames) additive mask hiding encoder frames past each utterance's length."""
    valid = valid_mask(lengths, frames)
    return additive_mask(valid[:, None, None, :], dtype)


class MultiHeadAttention(nn.Module):
    """NeMo's transformer MultiHeadAttention: q and k are each divided by d_head**0.25 before q.k^T."""

    def __init__(self, hidden_size: int, n_heads: int, cross: bool = False):
        super().__init__()
        self.cross = cross
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {n_heads}")
        self.n_heads = n_heads
        self.scale = (hidden_size // n_heads) ** 0.25
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def __call__(
        self,
        x: mx.array,
        xa: mx.array | None = None,
        mask: mx.array | None = None,
        kv_cache: tuple[mx.array, mx.array] | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Self-attention: the cache holds earlier positions and is extended. Cross-attention over `xa`:
        the cache holds its keys/values, computed once per utterance and reused (xa then unused)."""
        q = self.query(x)
        if not self.cross:
            k, v = self.key(x), self.value(x)
            if kv_cache is not None:
                k = mx.concatenate([kv_cache[0], k], axis=1)
                v = mx.concatenate([kv_cache[1], v], axis=1)
        elif kv_cache is not None:
            k, v = kv_cache
        elif xa is not None:
            k, v = self.key(xa), self.value(xa)
        else:
            raise ValueError("cross-attention needs the encoder states or their cached keys/values")
        return self.out(self._attend(q, k, v, mask)), (k, v)

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        b, lq, d = q.shape
        h = self.n_heads
        q = q.reshape(b, lq, h, -1).transpose(0, 2, 1, 3) / self.scale
        k = k.reshape(b, k.shape[1], h, -1).transpose(0, 2, 3, 1) / self.scale
        v = v.reshape(b, v.shape[1], h, -1).transpose(0, 2, 1, 3)
        scores = q @ k
        if mask is not None:
            scores = scores + mask
        weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
        return (weights @ v).transpose(0, 2, 1, 3).reshape(b, lq, d)


class DecoderBlock(nn.Module):
    """NeMo's pre-LN TransformerDecoderBlock: x += SA(LN1 x); x += XA(LN2 x, enc); x += FFN(LN3 x)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.attn_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.attn = MultiHeadAttention(hidden, heads)
        self.cross_attn_ln = nn.LayerNorm(hidden, eps=NORM_EPS)
        self.cross_attn = MultiHeadAttention(hidden, heads, cross=True)
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

    def __call__(
        self,
        x: mx.array,
        xa: mx.array | None,
        mask: mx.array | None,
        xa_mask: mx.array | None,
        kv_cache: tuple | None = None,
    ) -> tuple[mx.array, tuple]:
        self_kv, cross_kv = kv_cache if kv_cache is not None else (None, None)
        y, self_kv = self.attn(self.attn_ln(x), mask=mask, kv_cache=self_kv)
        x = x + y
        y, cross_kv = self.cross_attn(self.cross_attn_ln(x), xa, mask=xa_mask, kv_cache=cross_kv)
        x = x + y
        x = x + self.mlp2(self.act(self.mlp1(self.mlp_ln(x))))
        return x, (self_kv, cross_kv)


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
        """Run `tokens` (B, L) at positions offset..offset+L-1, offset = cached length.

        xa: encoder states (B, T, H); may be None once the cache holds the cross keys/values;
        xa_lengths: (B,) valid encoder frames, None = all valid;
        token_mask: optional (B, offset+L) boolean, False for pad keys (NeMo's decoder_mask), combined
        with the causal mask.
        Returns hidden states (B, L, H) after the final LayerNorm, and the updated cache.
        """
        if xa is None and not kv_cache:
            raise ValueError("the first decoder call needs the encoder states")
        offset = kv_cache[0][0][0].shape[1] if kv_cache else 0
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
        xa_mask = None
        if xa_lengths is not None:
            frames = xa.shape[1] if xa is not None else kv_cache[0][1][0].shape[1]
            xa_mask = cross_attention_mask(xa_lengths, frames, x.dtype)

        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, block_cache = block(x, xa, mask, xa_mask, kv_cache[i] if kv_cache else None)
            new_cache.append(block_cache)
        if "ln" in self:
            x = self.ln(x)
        return x, new_cache

    def logprobs(self, hidden: mx.array) -> mx.array:
        """NeMo's TokenClassifier head: tied-weight linear plus bias, then log_softmax (in float32)."""
        logits = self.token_embedding.as_linear(hidden) + self.output_bias
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
