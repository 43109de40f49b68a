"""NeMo's FastConformer encoder (ConformerEncoder with dw_striding subsampling and rel_pos attention).

Channels-last throughout (MLX convolutions want (B, T, C)); every padding mask NeMo applies is
applied here too, so a padded batch gives each utterance the result it gets alone.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import native
from ..cpu.activations import attention, product, sigmoid, silu
from ..cpu.widened import linear
from ..config import EncoderConfig
from ..masks import MASK_VALUE, additive_mask, valid_mask

# torch.nn.LayerNorm and BatchNorm1d defaults, which NeMo's conformer uses unchanged.
NORM_EPS = 1e-5



def _frame_mask(lengths: mx.array, x: mx.array) -> mx.array:
    """1 on the real frames of x (B, T, ...), 0 on padding, shaped to multiply x: a product, rather than
    mx.where, keeps the masking vectorised on MLX's CPU backend."""
    valid = valid_mask(lengths, x.shape[1]).astype(x.dtype)
    return valid.reshape(*valid.shape, *([1] * (x.ndim - 2)))


def _conv_length(lengths: mx.array) -> mx.array:
    """Frames after one NeMo subsampling conv (kernel 3, stride 2, padding 1 each side)."""
    return mx.floor_divide(lengths + 2 * 1 - 3, 2) + 1


class ConvSubsampling(nn.Module):
    """NeMo's ConvSubsampling('dw_striding') with its MaskedConvSequential masking.

    `conv` keeps NeMo's nn.Sequential indices (ReLUs included) so weight names line up: 0 is the
    full 1->C conv, then per extra stage a depthwise 3x3/2 conv, a pointwise 1x1 conv and a ReLU.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        factor = config.subsampling_factor
        stages = int(math.log2(factor))
        if 2**stages != factor or stages < 1:
            raise ValueError(f"subsampling_factor must be a power of two, got {factor}")
        channels = config.conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
            ]
        self.conv = layers
        freq = config.feat_in
        for _ in range(stages):
            freq = (freq + 2 * 1 - 3) // 2 + 1
        # NeMo flattens (channel, frequency) channel-major into the linear's input.
        self.out = nn.Linear(channels * freq, config.d_model)

    def __call__(self, x: mx.array, lengths: mx.array, padded: bool) -> tuple[mx.array, mx.array]:
        """x (B, T, F) -> (B, T', d_model); lengths follow each stride-2 conv. Without `padded` frames
        every mask is all ones and is skipped."""
        if len(self.conv) > 2 and native.available():
            x, lengths = self._native_convs(x, lengths, padded)
        else:
            x, lengths = self._mlx_convs(x, lengths, padded)
        if padded:
            x = x * _frame_mask(lengths, x)
        b, t, f, c = x.shape
        x = x.transpose(0, 1, 3, 2).reshape(b, t, c * f)
        return self.out(x), lengths

    def _native_convs(self, x: mx.array, lengths: mx.array, padded: bool) -> tuple[mx.array, mx.array]:
        """The stride-2 convs by the `_encoder` extension (cpu/native.py), the pointwise ones by the BLAS:
        the same layers and masks, with each ReLU before a depthwise conv applied as that conv reads."""
        first, _, depthwise = self.conv[:3]
        mid = _conv_length(lengths)
        x = native.stem(x, lengths, mid, (first.weight, first.bias), (depthwise.weight, depthwise.bias))
        lengths = _conv_length(mid)
        rest = self.conv[3:]
        for index, layer in enumerate(rest):
            if isinstance(layer, nn.ReLU) and index + 1 < len(rest):
                continue  # the next depthwise conv applies it
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                # It also reads the rows at or past each length as zeros: NeMo's masks before the ReLU and the conv.
                x = native.relu_depthwise(x, lengths, (layer.weight, layer.bias))
                lengths = _conv_length(lengths)
                continue
            if padded:
                x = x * _frame_mask(lengths, x)
            x = _pointwise(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        return x, lengths

    def _mlx_convs(self, x: mx.array, lengths: mx.array, padded: bool) -> tuple[mx.array, mx.array]:
        x = x[..., None]  # (B, T, F, 1): time is the conv's height, frequency its width
        for layer in self.conv:
            # MaskedConvSequential zeroes padded frames before every layer ...
            if padded:
                x = x * _frame_mask(lengths, x)
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                x = _depthwise_3x3_stride2(x, layer.weight, layer.bias)
            elif isinstance(layer, nn.Conv2d) and layer.weight.shape[1:3] == (1, 1):
                x = _pointwise(layer, x)
            else:
                x = layer(x)
            # ... and recomputes the lengths after each strided conv.
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                lengths = _conv_length(lengths)
        return x, lengths


def _pointwise(conv: nn.Conv1d | nn.Conv2d, x: mx.array) -> mx.array:
    """A kernel-1 convolution (weight (out, 1[, 1], in)) over channels-last x as one matrix product with the
    bias added by the BLAS: half the time of MLX's convolution, which copies and adds the bias separately."""
    weight = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[-1])
    return linear(x, weight, conv.get("bias"))


@mx.compile
def _depthwise_3x3_stride2(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """The subsampling's depthwise conv (3x3, stride 2, padding 1; weight (C, 3, 3, 1)) as nine strided
    multiply-adds, fused: 74 against 112 ms for MLX's grouped convolution on canary's first stage."""
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    height, width = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    out = bias
    for row in range(3):
        for column in range(3):
            taps = padded[:, row : row + 2 * height - 1 : 2, column : column + 2 * width - 1 : 2]
            out = out + taps * weight[:, row, column, 0]
    return out


@functools.lru_cache(maxsize=4)
def relative_positions(length: int, d_model: int) -> np.ndarray:
    """NeMo's RelPositionalEncoding rows for offsets length-1 ... -(length-1), as (2*length-1, d_model).

    Computed in float32 numpy the way NeMo builds its `pe` buffer (float32 positions times a float32
    exp() term, then sin/cos), so the table matches NeMo's and does not depend on the device's sin.
    """
    positions = np.arange(length - 1, -length, -1, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model)))
    angles = positions * div_term
    pe = np.zeros((2 * length - 1, d_model), dtype=np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    pe.flags.writeable = False  # shared through the cache
    return pe


def local_relative_positions(left: int, right: int, d_model: int) -> np.ndarray:
    """NeMo's LocalAttRelPositionalEncoding rows: offsets left ... -right, as (left+right+1, d_model), the same
    values as relative_positions gives those offsets."""
    table = relative_positions(max(left, right) + 1, d_model)
    centre = max(left, right)  # the row of offset 0
    return table[centre - left: centre + right + 1]


# Queries per block of local attention: the scores held at once are (block, block + left + right) per head.
LOCAL_BLOCK = 256


def _joined(heads: mx.array) -> mx.array:
    """Per-head outputs (B, h, T, d_head) as rows (B, T, h * d_head), heads side by side as NeMo joins them."""
    b, h, t, dk = heads.shape
    return heads.transpose(0, 2, 1, 3).reshape(b, t, h * dk)


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL attention as in NeMo: (q+u)k^T + rel_shift((q+v)p^T), scaled by 1/sqrt(d_head).

    NeMo's untie_biases=False shares one u/v pair across layers; its state dict still stores the shared
    tensor under every layer's name, so each layer keeps its own pos_bias_u/v here in both cases.
    """

    def __init__(self, d_model: int, n_heads: int, use_bias: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)  # NeMo: never a bias here
        self.pos_bias_u = mx.zeros((n_heads, self.d_head))
        self.pos_bias_v = mx.zeros((n_heads, self.d_head))

    @staticmethod
    def rel_shift(x: mx.array) -> mx.array:
        """The first T columns of NeMo's pad-and-reshape shift of x (B, h, T, 2T-1): column j of row i holds
        offset i-j, table row T-1-i+j, i.e. x[..., i, T-1-i+j]. Read as one strided view and copied once: a
        fifth of the time of padding, reshaping and slicing (three copies of the full product)."""
        b, h, t, p = x.shape
        x = mx.contiguous(x)
        return mx.contiguous(mx.as_strided(x, (b, h, t, t), (h * t * p, t * p, p - 1, 1), t - 1))

    def __call__(self, x: mx.array, pos_emb: mx.array, mask: mx.array | None, valid: mx.array | None) -> mx.array:
        """x (B, T, d); pos_emb (2T-1, d); mask (B, 1, T, T) additive, -10000 unless query and key are both
        real frames, and valid (B, T, 1) 1 on real frames (both None when no frame is padding)."""
        if native.attention_available():
            return self._native(x, pos_emb, mask, valid)
        scale = 1 / math.sqrt(self.d_head)
        q_u, q_v, k, v, p = self._heads(x, pos_emb)
        # NeMo shifts the full (T, 2T-1) product, then keeps the first T columns; `attention` adds it,
        # scaled, to (q+u)k^T/sqrt(d_head) as an additive mask.
        bias = self.rel_shift(product(q_v, p.transpose(0, 1, 3, 2)).astype(x.dtype)) * scale
        if mask is not None:
            # NeMo fills masked scores with -10000; adding -10000 gives those keys the same zero weight.
            bias = bias + mask
        return self._output(_joined(attention(q_u, k, v, scale, bias)), valid)

    def _native(self, x: mx.array, pos_emb: mx.array, mask: mx.array | None, valid: mx.array | None,
                context: tuple[int, int] | None = None) -> mx.array:
        """Full or local attention by the extension (cpu/native.py): the products and the softmax on the
        projections as they are."""
        q, k, v = self.linear_q(x), self.linear_k(x), self.linear_v(x)
        out = native.rel_attention(q, k, v, self.linear_pos(pos_emb)[None], self.pos_bias_u, self.pos_bias_v, mask,
                                   1 / math.sqrt(self.d_head), context)
        return self._output(out, valid)

    def _output(self, out: mx.array, valid: mx.array | None) -> mx.array:
        """The heads' joined outputs (B, T, d) projected."""
        if valid is not None:
            # NeMo zeroes the weights of masked pairs after the softmax: padded query rows become all zero.
            out = out * valid
        return self.linear_out(out)

    def _heads(self, x: mx.array, pos_emb: mx.array) -> tuple[mx.array, ...]:
        """(q+u, q+v, k, v) as (B, h, T, d_head) and the projected positions p as (1, h, P, d_head)."""
        b, t, _ = x.shape
        h, dk = self.n_heads, self.d_head
        q = self.linear_q(x).reshape(b, t, h, dk)
        k = self.linear_k(x).reshape(b, t, h, dk).transpose(0, 2, 1, 3)
        v = self.linear_v(x).reshape(b, t, h, dk).transpose(0, 2, 1, 3)
        p = self.linear_pos(pos_emb).reshape(1, -1, h, dk).transpose(0, 2, 1, 3)
        q_u = (q + self.pos_bias_u).transpose(0, 2, 1, 3)
        q_v = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        return q_u, q_v, k, v, p

    def local(self, x: mx.array, pos_emb: mx.array, key_padding: mx.array | None, valid: mx.array | None,
              context: tuple[int, int]) -> mx.array:
        """NeMo's rel_pos_local_attn (RelPositionMultiHeadAttentionLongformer, no global tokens): each query
        attends to keys `left` before to `right` after it; pos_emb holds offsets left ... -right.

        NeMo computes it in overlapping chunks; here blocks of queries take their band of keys, so the memory
        stays linear in the length: the same scores, and the same -10000 on padded keys. key_padding (B, 1, 1, T)
        is additive, valid (B, T, 1) zeroes padded queries (both None without padding).
        """
        if native.attention_available():
            return self._native(x, pos_emb, key_padding, valid, context)
        left, right = context
        b, t, _ = x.shape
        h, dk = self.n_heads, self.d_head
        scale = 1 / math.sqrt(dk)
        q_u, q_v, k, v, p = self._heads(x, pos_emb)  # p: (1, h, left+right+1, dk)
        width = left + right + 1
        blocks = []
        for start in range(0, t, LOCAL_BLOCK):
            end = min(start + LOCAL_BLOCK, t)
            first, last = max(0, start - left), min(t, end + right)
            # Column c of q_v p^T is offset left - c, the key `query - left + c`.
            columns = mx.arange(first, last)[None, :] - mx.arange(start, end)[:, None] + left
            in_band = (columns >= 0) & (columns < width)
            by_offset = product(q_v[:, :, start:end], p.transpose(0, 1, 3, 2)).astype(x.dtype)
            positional = mx.take_along_axis(by_offset, mx.broadcast_to(mx.clip(columns, 0, width - 1),
                                                                        (b, h, end - start, last - first)), axis=-1)
            bias = mx.where(in_band, positional * scale, mx.array(MASK_VALUE, dtype=x.dtype))
            if key_padding is not None:
                bias = bias + key_padding[..., first:last]
            blocks.append(attention(q_u[:, :, start:end], k[:, :, first:last], v[:, :, first:last], scale, bias))
        return self._output(_joined(mx.concatenate(blocks, axis=2)), valid)


def _unbiased(weight: mx.array, bias: mx.array | None, x: mx.array) -> tuple[mx.array, mx.array | None]:
    """x @ weight.T, and the bias still to add, for a native kernel to add on its pass over the product, where
    both are float32 on an x86 CPU (MLX's addmm copies the bias into every row first); otherwise the whole
    product, widened where `linear` widens, and None."""
    if bias is not None and native.available() and weight.dtype == x.dtype == mx.float32:
        return x @ weight.T, bias
    return linear(x, weight, bias), None


class FeedForward(nn.Module):
    """Conformer feed-forward: linear -> Swish (SiLU) -> linear."""

    def __init__(self, d_model: int, d_ff: int, use_bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def __call__(self, x: mx.array) -> mx.array:
        if not native.available():
            return self.linear2(silu(self.linear1(x)))
        if isinstance(self.linear1, nn.Linear):
            hidden, bias = _unbiased(self.linear1.weight, self.linear1.get("bias"), x)
        else:  # quantized: the layer's own product
            hidden, bias = self.linear1(x), None
        # The hidden product is this call's own: its SiLU is written over it.
        return self.linear2(native.silu(hidden, bias, overwrite=True))


class BatchNorm(nn.Module):
    """BatchNorm1d in inference form only: running statistics, NeMo's default eps 1e-5.

    A dedicated module (rather than nn.BatchNorm) so a model left in training mode cannot
    silently switch to batch statistics.
    """

    def __init__(self, dims: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.running_mean = mx.zeros((dims,))
        self.running_var = mx.ones((dims,))
        self.freeze(keys=["running_mean", "running_var"], recurse=False)

    @property
    def factor(self) -> mx.array:
        """What the normalisation multiplies by: weight / sqrt(running_var + eps)."""
        return mx.rsqrt(self.running_var + self.eps) * self.weight

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.running_mean) * self.factor + self.bias


class ConvModule(nn.Module):
    """Conformer convolution: pointwise d->2d, GLU, pad-mask, depthwise, BatchNorm, SiLU, pointwise."""

    def __init__(self, d_model: int, kernel_size: int, use_bias: bool):
        super().__init__()
        if (kernel_size - 1) % 2:
            raise ValueError(f"conv_kernel_size must be odd, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=use_bias)
        # NeMo's default conv_context_size is symmetric: (k-1)/2 zeros each side.
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model, bias=use_bias
        )
        self.batch_norm = BatchNorm(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=use_bias)

    def __call__(self, x: mx.array, valid: mx.array | None) -> mx.array:
        """x (B, T, d); valid (B, T, 1) 1 on real frames (None when no frame is padding)."""
        if native.available():
            conv = self.pointwise_conv1
            x = native.glu(*_unbiased(conv.weight.reshape(conv.weight.shape[0], -1), conv.get("bias"), x))
        else:
            x = _pointwise(self.pointwise_conv1, x)
            a, gate = mx.split(x, 2, axis=-1)  # torch GLU: first half times sigmoid(second half)
            x = a * sigmoid(gate)
        # NeMo zeroes padded frames before the depthwise conv so they cannot leak into real ones.
        if valid is not None:
            x = x * valid
        if native.available():
            norm = self.batch_norm
            x = native.depthwise_bn_silu(x, self.depthwise_conv.weight, self.depthwise_conv.get("bias"),
                                         norm.running_mean, norm.factor, norm.bias)
        else:
            x = silu(self.batch_norm(self._depthwise(x)))
        return _pointwise(self.pointwise_conv2, x)

    def _depthwise(self, x: mx.array) -> mx.array:
        """`depthwise_conv` as k shifted multiply-adds over time: the same sums, about 9x faster than MLX's
        grouped convolution on a CPU (14 against 1.5 ms per canary-1b layer on 30 s of audio)."""
        conv = self.depthwise_conv
        kernel = conv.weight.shape[1]
        pad = (kernel - 1) // 2
        frames = x.shape[1]
        padded = mx.pad(x, [(0, 0), (pad, pad), (0, 0)])
        out = padded[:, :frames] * conv.weight[:, 0, 0]
        for tap in range(1, kernel):
            out = out + padded[:, tap : tap + frames] * conv.weight[:, tap, 0]
        return out + conv.bias if "bias" in conv else out


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, by the `_encoder` extension on x86 CPUs (MLX's kernel runs on one thread there)."""

    def __call__(self, x: mx.array) -> mx.array:
        if native.available():
            return native.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


class ConformerLayer(nn.Module):
    """Macaron block: x + FF1/2, + MHSA, + Conv, + FF2/2, then LayerNorm (NeMo's fc_factor 0.5)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d, bias = config.d_model, config.use_bias
        d_ff = d * config.ff_expansion_factor
        self.norm_feed_forward1 = LayerNorm(d, eps=NORM_EPS)
        self.feed_forward1 = FeedForward(d, d_ff, bias)
        self.norm_conv = LayerNorm(d, eps=NORM_EPS)
        self.conv = ConvModule(d, config.conv_kernel_size, bias)
        self.norm_self_att = LayerNorm(d, eps=NORM_EPS)
        self.self_attn = RelPositionMultiHeadAttention(d, config.n_heads, bias)
        self.norm_feed_forward2 = LayerNorm(d, eps=NORM_EPS)
        self.feed_forward2 = FeedForward(d, d_ff, bias)
        self.norm_out = LayerNorm(d, eps=NORM_EPS)

    def __call__(self, x: mx.array, pos_emb: mx.array, att_mask: mx.array | None, valid: mx.array | None,
                 context: tuple[int, int] | None = None) -> mx.array:
        x, h = _add_and_norm(x, self.feed_forward1(self.norm_feed_forward1(x)), 0.5, self.norm_self_att)
        if context is None:
            attended = self.self_attn(h, pos_emb, att_mask, valid)
        else:
            attended = self.self_attn.local(h, pos_emb, att_mask, valid, context)
        x, h = _add_and_norm(x, attended, 1.0, self.norm_conv)
        x, h = _add_and_norm(x, self.conv(h, valid), 1.0, self.norm_feed_forward2)
        return _add_and_norm(x, self.feed_forward2(h), 0.5, self.norm_out)[1]


def _add_and_norm(x: mx.array, update: mx.array, factor: float, norm: LayerNorm) -> tuple[mx.array, mx.array]:
    """NeMo's residual step x + factor * update (factor 0.5 for the feed-forwards, fc_factor), and the next
    module's LayerNorm of it. `update` is a module's fresh output: the native pass writes the sum over it."""
    if native.available():
        return native.add_layer_norm(x, update, factor, norm.weight, norm.bias, norm.eps)
    x = x + factor * update if factor != 1 else x + update
    return x, norm(x)


class ConformerEncoder(nn.Module):
    """Features (B, feat_in, T) -> encoded (B, T', d_model), T' = T subsampled by subsampling_factor."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if config.subsampling != "dw_striding":
            raise ValueError(f"unsupported encoder.subsampling={config.subsampling!r}")
        if config.self_attention_model != "rel_pos":
            raise ValueError(f"unsupported encoder.self_attention_model={config.self_attention_model!r}")
        if config.conv_norm_type != "batch_norm":
            raise ValueError(f"unsupported encoder.conv_norm_type={config.conv_norm_type!r}")
        self.d_model = config.d_model
        # NeMo's xscaling multiplies the subsampled input by sqrt(d_model) inside the positional encoding.
        self.xscale = math.sqrt(config.d_model) if config.xscaling else None
        self.pre_encode = ConvSubsampling(config)
        self.layers = [ConformerLayer(config) for _ in range(config.n_layers)]
        # (left, right) frames of local attention, NeMo's change_attention_model("rel_pos_local_attn", [left,
        # right]); None: full attention, as the checkpoint was trained.
        self.local_context: tuple[int, int] | None = None

    def use_local_attention(self, context: tuple[int, int] | None) -> None:
        """Attend to `context` = (left, right) frames around each frame (memory linear in the length), or to
        every frame again (None). Only left == right: with unequal contexts NeMo's Longformer attention adds the
        positional term to the wrong columns (multi_head_attention.py, ac[..., -(right+1):] assumes the window
        is right), which would not be a banded attention to reproduce."""
        if context is not None:
            left, right = context
            if not (left > 0 and left == right):
                raise ValueError(f"local attention context {left},{right}: give two equal positive sizes, such as "
                                 "128,128 (NVIDIA's recipe for Parakeet)")
            context = (int(left), int(right))
        self.local_context = context

    def __call__(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        x = features.transpose(0, 2, 1)  # NeMo transposes (B, F, T) to (B, T, F) before subsampling
        lengths = lengths.astype(mx.int32)
        # NeMo masks padded frames at every stage; when no utterance is shorter than the batch, every mask
        # is all ones and costs time for nothing (one look at the lengths decides it).
        padded = bool(mx.any(lengths < x.shape[1]).item())
        x, lengths = self.pre_encode(x, lengths, padded)
        if self.xscale is not None:
            x = x * self.xscale
        t = x.shape[1]
        context = self.local_context
        table = relative_positions(t, self.d_model) if context is None else local_relative_positions(*context, self.d_model)
        pos_emb = mx.array(table).astype(x.dtype)
        att_mask = valid = None
        if padded:
            real = valid_mask(lengths, t)
            if context is None:
                # NeMo's att_mask: a pair is visible only when both its query and its key are real frames.
                att_mask = additive_mask((real[:, :, None] & real[:, None, :])[:, None], x.dtype)
            else:
                # Local attention masks padded keys; padded queries are zeroed afterwards.
                att_mask = additive_mask(real[:, None, None, :], x.dtype)
            valid = real[:, :, None].astype(x.dtype)
        for layer in self.layers:
            x = layer(x, pos_emb, att_mask, valid, context)
        return x, lengths
