"""The `_encoder` extension's kernels give what the MLX code they replace gives.

NeMo parity of the whole encoder is tests/test_parity.py's (it runs these kernels on Linux); here the subsampling's
convolutions and the attention are held against the MLX code they replace on shapes the tiny checkpoints do
not reach (the attention against numpy too): odd lengths and widths, several channel counts (vector remainders),
factors 4 to 16, padded batches with a sequence of one frame, a head width whose 1/sqrt is not a power of two;
SiLU and GLU over the range where exp saturates, with the bias their product was made without; the conv module
with kernels longer than a sequence; LayerNorm, alone and after the residual sum; a whole Conformer block.
"""

from __future__ import annotations

import contextlib
import platform

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from canary_convert.blas import one_thread_each
from canary_convert.extensions import extension_path
from canary_convert.model.config import EncoderConfig
from canary_convert.model.cpu import native
from canary_convert.model.cpu.activations import silu
from canary_convert.model.fastconformer.encoder import (
    ConformerLayer,
    ConvModule,
    ConvSubsampling,
    LayerNorm,
    RelPositionMultiHeadAttention,
    local_relative_positions,
    relative_positions,
)
from canary_convert.model.masks import additive_mask, valid_mask

pytestmark = pytest.mark.skipif(platform.machine().lower() in ("arm64", "aarch64"),
                                reason="the extension replaces MLX's x86 CPU kernels")


def _subsampling(feat_in: int, channels: int, factor: int) -> ConvSubsampling:
    config = EncoderConfig(feat_in=feat_in, d_model=48, n_layers=1, n_heads=4, ff_expansion_factor=4,
                           subsampling="dw_striding", subsampling_factor=factor, subsampling_conv_channels=channels,
                           conv_kernel_size=9, conv_norm_type="batch_norm", self_attention_model="rel_pos",
                           xscaling=True, untie_biases=True, pos_emb_max_len=5000, use_bias=True)
    mx.random.seed(factor * 1000 + channels)
    module = ConvSubsampling(config)
    # Biases of both signs, so each ReLU cuts somewhere.
    module.update({"conv": [{"bias": 0.5 * mx.random.normal(layer.bias.shape)} if "bias" in layer else {}
                            for layer in module.conv]})
    mx.eval(module.parameters())
    return module


def test_the_extension_is_built_and_used() -> None:
    assert extension_path("_encoder") is not None, "the _encoder extension was not built (no C compiler?)"
    assert native.available()
    # The attention multiplies through the OpenBLAS canary_convert gave MLX, its heads side by side.
    assert native.attention_available()
    with one_thread_each() as side_by_side:
        assert side_by_side


@pytest.mark.parametrize(("feat_in", "channels", "factor"), [(80, 256, 8), (128, 24, 4), (33, 19, 16), (7, 8, 8)])
# 65 frames: an odd count of first-conv rows, whose last one the depthwise conv reads and must see masked.
@pytest.mark.parametrize("lengths", [[101], [101, 1, 65]])
def test_native_convs_match_the_mlx_layers(feat_in: int, channels: int, factor: int, lengths: list[int]) -> None:
    module = _subsampling(feat_in, channels, factor)
    frames = max(lengths)
    x = mx.random.normal((len(lengths), frames, feat_in), key=mx.random.key(len(lengths)))
    valid = mx.array(lengths, dtype=mx.int32)
    padded = min(lengths) < frames
    native, native_lengths = module._native_convs(x, valid, padded)
    reference, reference_lengths = module._mlx_convs(x, valid, padded)
    assert native.shape == reference.shape and native.dtype == reference.dtype
    assert native_lengths.tolist() == reference_lengths.tolist()
    assert float(mx.abs(reference).max()) > 0.1  # a real signal, not zeros compared with zeros
    np.testing.assert_allclose(np.array(native), np.array(reference), rtol=1e-5, atol=1e-5)
    if padded:
        # Past its length a padded sequence's rows are exactly what MLX's masked layers give them.
        short = int(reference_lengths[1])
        np.testing.assert_array_equal(np.array(native[1, short + 1:] == 0), np.array(reference[1, short + 1:] == 0))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs_keep_their_dtype(dtype: mx.Dtype) -> None:
    module = _subsampling(80, 32, 8)
    module.set_dtype(dtype)
    x = mx.random.normal((1, 50, 80), key=mx.random.key(3)).astype(dtype)
    lengths = mx.array([50], dtype=mx.int32)
    native, _ = module._native_convs(x, lengths, False)
    reference, _ = module._mlx_convs(x, lengths, False)
    assert native.dtype == dtype
    np.testing.assert_allclose(np.array(native.astype(mx.float32)), np.array(reference.astype(mx.float32)),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("d_model", "heads", "lengths"), [(64, 4, [37]), (96, 4, [50, 1, 23]), (512, 8, [376, 200])])
def test_native_attention_matches_the_mlx_attention(d_model: int, heads: int, lengths: list[int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative shift, the scale (1/sqrt(24) is not a power of two), the mask of a padded batch and the softmax,
    through the whole attention module, with the extension and with the MLX code it replaces."""
    mx.random.seed(d_model)
    attention = RelPositionMultiHeadAttention(d_model, heads, use_bias=True)
    attention.update({"pos_bias_u": mx.random.normal((heads, d_model // heads)),
                      "pos_bias_v": mx.random.normal((heads, d_model // heads))})
    frames = max(lengths)
    x = 2.0 * mx.random.normal((len(lengths), frames, d_model))
    positions = mx.array(relative_positions(frames, d_model))
    mask = valid = None
    if min(lengths) < frames:
        real = valid_mask(mx.array(lengths), frames)
        mask = additive_mask((real[:, :, None] & real[:, None, :])[:, None], x.dtype)
        valid = real[:, :, None].astype(x.dtype)
    mx.eval(attention.parameters(), x, positions)
    native_out = attention(x, positions, mask, valid)
    monkeypatch.setattr(native, "available", lambda: False)
    reference = attention(x, positions, mask, valid)
    assert float(mx.abs(reference).max()) > 0.1
    np.testing.assert_allclose(np.array(native_out), np.array(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("d_model", "heads", "lengths", "context"),
                         [(64, 4, [300], (20, 20)), (96, 4, [290, 1, 150], (8, 8)), (64, 4, [37, 30], (64, 64))])
@pytest.mark.parametrize("side_by_side", [True, False])
def test_native_local_attention_matches_the_mlx_attention(d_model: int, heads: int, lengths: list[int],
                                                          context: tuple[int, int], side_by_side: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Local attention's bands (several blocks of queries, a context longer than the sequence, a sequence of one
    frame, padded keys inside the band), with the extension and with the MLX code it replaces."""
    if not side_by_side:
        monkeypatch.setattr(native, "one_thread_each", lambda: contextlib.nullcontext(False))
    mx.random.seed(d_model + context[0])
    attention = RelPositionMultiHeadAttention(d_model, heads, use_bias=True)
    attention.update({"pos_bias_u": mx.random.normal((heads, d_model // heads)),
                      "pos_bias_v": mx.random.normal((heads, d_model // heads))})
    frames = max(lengths)
    x = 2.0 * mx.random.normal((len(lengths), frames, d_model))
    positions = mx.array(local_relative_positions(*context, d_model))
    key_padding = valid = None
    if min(lengths) < frames:
        real = valid_mask(mx.array(lengths), frames)
        key_padding = additive_mask(real[:, None, None, :], x.dtype)
        valid = real[:, :, None].astype(x.dtype)
    mx.eval(attention.parameters(), x, positions)
    native_out = attention.local(x, positions, key_padding, valid, context)
    monkeypatch.setattr(native, "available", lambda: False)
    reference = attention.local(x, positions, key_padding, valid, context)
    assert float(mx.abs(reference).max()) > 0.1
    np.testing.assert_allclose(np.array(native_out), np.array(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("side_by_side", [True, False])
def test_native_attention_is_the_shifted_scaled_masked_softmax_of_each_head(masked: bool, side_by_side: bool,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each head's softmax(((q+u)k^T)[i, j] + ((q+v)p^T)[i, T-1-i+j]) * scale + mask[i, j]) v against numpy in float64,
    read from and written to (B, T, h * d_head) rows: a head width (5) and frame count (21) that are no vector width;
    heads side by side on one-thread OpenBLAS, and one at a time as under a BLAS that keeps its own threading."""
    if not side_by_side:
        monkeypatch.setattr(native, "one_thread_each", lambda: contextlib.nullcontext(False))
    rng = np.random.default_rng(0)
    batch, heads, d_head, frames, scale = 2, 3, 5, 21, 0.3
    q, k, v = (rng.normal(size=(batch, frames, heads * d_head)).astype(np.float32) for _ in range(3))
    p = rng.normal(size=(1, 2 * frames - 1, heads * d_head)).astype(np.float32)
    bias_u, bias_v = (rng.normal(size=(heads, d_head)).astype(np.float32) for _ in range(2))
    mask = np.where(rng.random((batch, 1, frames, frames)) < 0.3, -10000.0, 0.0).astype(np.float32) if masked else None
    got = np.array(native.rel_attention(*(mx.array(a) for a in (q, k, v, p, bias_u, bias_v)),
                                        None if mask is None else mx.array(mask), scale))

    def per_head(a: np.ndarray) -> np.ndarray:  # (B, T, h * d_head) -> (B, h, T, d_head), float64
        return a.astype(np.float64).reshape(a.shape[0], -1, heads, d_head).transpose(0, 2, 1, 3)

    q_, k_, v_, p_ = (per_head(a) for a in (q, k, v, p))
    ac = (q_ + bias_u[:, None]) @ k_.swapaxes(-1, -2)
    bd = (q_ + bias_v[:, None]) @ p_.swapaxes(-1, -2)
    rows, columns = np.arange(frames)[:, None], np.arange(frames)[None, :]
    scores = (ac + bd[..., rows, frames - 1 - rows + columns]) * scale + (0 if mask is None else mask)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    want = (weights @ v_).transpose(0, 2, 1, 3).reshape(batch, frames, heads * d_head)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_native_silu_and_glu_match_the_composed_ones(dtype: mx.Dtype) -> None:
    """Against the MLX-composed SiLU/GLU they replace and numpy's float64, over the range where exp saturates."""
    x = mx.concatenate([mx.linspace(-100, 100, 2001), 6.0 * mx.random.normal((2003,), key=mx.random.key(5))])
    x = x.reshape(-1, 2, 1001).astype(dtype)  # odd last axis: vector remainders; GLU halves of 1001
    values = np.array(x.astype(mx.float32), dtype=np.float64)
    tolerance = 1e-6 if dtype == mx.float32 else 1e-2
    got = native.silu(x)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(silu(x).astype(mx.float32)),
                               rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), values / (1 + np.exp(-values)),
                               rtol=max(tolerance, 2e-6), atol=tolerance)
    pairs = x.reshape(-1, 2002)
    a, gate = np.split(np.array(pairs.astype(mx.float32), dtype=np.float64), 2, axis=-1)
    glu = native.glu(pairs)
    assert glu.dtype == dtype and glu.shape == (pairs.shape[0], 1001)
    np.testing.assert_allclose(np.array(glu.astype(mx.float32)), a / (1 + np.exp(-gate)),
                               rtol=max(tolerance, 2e-6), atol=tolerance)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_native_silu_and_glu_add_the_bias_and_overwrite_only_float32_products(dtype: mx.Dtype) -> None:
    """SiLU(x + bias) and GLU(x + bias), the linear layer's bias the product was computed without, against numpy's
    float64; with `overwrite` the SiLU is the product's own float32 array (its memory holds the result), while
    a half-precision one is left as it was."""
    rng = np.random.default_rng(1)
    values = (6.0 * rng.standard_normal((3, 8, 1001))).astype(np.float32)  # odd last axis: vector remainders
    bias = (2.0 * rng.standard_normal(1001)).astype(np.float32)
    product = mx.array(values).astype(dtype)
    widened = np.array(product.astype(mx.float32), dtype=np.float64)
    tolerance = 2e-6 if dtype == mx.float32 else 2e-2
    got = native.silu(product, mx.array(bias), overwrite=True)
    assert got.dtype == dtype and got.shape == product.shape
    assert (got is product) == (dtype == mx.float32)
    if dtype != mx.float32:
        np.testing.assert_array_equal(np.array(product.astype(mx.float32)), widened)  # not written over
    summed = widened + bias
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), summed / (1 + np.exp(-summed)), rtol=tolerance,
                               atol=tolerance)
    pairs = mx.array(values.reshape(-1, 2002)).astype(dtype)
    pair_bias = (2.0 * rng.standard_normal(2002)).astype(np.float32)
    a, gate = np.split(np.array(pairs.astype(mx.float32), dtype=np.float64) + pair_bias, 2, axis=-1)
    glu = native.glu(pairs, mx.array(pair_bias))
    assert glu.dtype == dtype and glu.shape == (pairs.shape[0], 1001)
    np.testing.assert_allclose(np.array(glu.astype(mx.float32)), a / (1 + np.exp(-gate)), rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("factor", [0.5, 1.0])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_native_residual_step_is_the_sum_and_its_layer_norm(factor: float, biased: bool, dtype: mx.Dtype) -> None:
    """x + factor * (update + bias) rounded as torch rounds x + factor * update (factor exact), and its LayerNorm
    against numpy's float64; the sum is written over a float32 update, a half-precision one is left as it was."""
    rng = np.random.default_rng(2)
    width = 36  # vector remainders
    x, update = (mx.array(rng.standard_normal((2, 5, width)).astype(np.float32)).astype(dtype) for _ in range(2))
    bias = mx.array(rng.standard_normal(width).astype(np.float32)) if biased else None
    weight, shift = (mx.array(rng.standard_normal(width).astype(np.float32)) for _ in range(2))
    update_before = np.array(update.astype(mx.float32))
    # In float32 as torch rounds it: the layer's output (its bias in), then the residual sum.
    output = update_before if bias is None else update_before + np.array(bias)
    want = np.array(x.astype(mx.float32)) + np.float32(factor) * output
    summed, normed = native.add_layer_norm(x, update, factor, weight, shift, 1e-5, bias)
    assert summed.dtype == normed.dtype == dtype and summed.shape == normed.shape == x.shape
    assert (summed is update) == (dtype == mx.float32)
    if dtype == mx.float32:
        np.testing.assert_array_equal(np.array(summed), want)
    else:
        np.testing.assert_array_equal(np.array(update.astype(mx.float32)), update_before)
    values = np.array(summed.astype(mx.float32), dtype=np.float64)
    centred = values - values.mean(axis=-1, keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-5) * np.array(weight) + np.array(shift)
    tolerance = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(np.array(normed.astype(mx.float32)), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("lengths", [[45], [45, 17]])
def test_native_conformer_layer_matches_the_mlx_layers(dtype: mx.Dtype, lengths: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole Conformer block (feed-forwards with their biases added by the SiLU, residual steps fused with the
    next LayerNorm, attention, conv module) with the extension and with the MLX code it replaces, alone and in a
    padded batch; the input is left as it was."""
    config = EncoderConfig(feat_in=80, d_model=64, n_layers=1, n_heads=4, ff_expansion_factor=4,
                           subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=16,
                           conv_kernel_size=9, conv_norm_type="batch_norm", self_attention_model="rel_pos",
                           xscaling=True, untie_biases=True, pos_emb_max_len=5000, use_bias=True)
    mx.random.seed(len(lengths))
    layer = ConformerLayer(config)
    layer.update(tree_map(lambda a: 0.5 * mx.random.normal(a.shape), layer.parameters()))
    layer.conv.batch_norm.update({"running_var": mx.random.uniform(0.2, 3.0, (64,))})
    layer.set_dtype(dtype)
    frames = max(lengths)
    x = mx.random.normal((len(lengths), frames, 64)).astype(dtype)
    positions = mx.array(relative_positions(frames, 64)).astype(dtype)
    mask = valid = None
    if min(lengths) < frames:
        real = valid_mask(mx.array(lengths), frames)
        mask = additive_mask((real[:, :, None] & real[:, None, :])[:, None], dtype)
        valid = real[:, :, None].astype(dtype)
    mx.eval(layer.parameters(), x, positions)
    x_before = np.array(x.astype(mx.float32))
    native_out = layer(x, positions, mask, valid)
    np.testing.assert_array_equal(np.array(x.astype(mx.float32)), x_before)
    monkeypatch.setattr(native, "available", lambda: False)
    reference = layer(x, positions, mask, valid)
    assert native_out.dtype == dtype and float(mx.abs(reference.astype(mx.float32)).max()) > 0.1
    tolerance = 1e-5 if dtype == mx.float32 else 5e-2
    np.testing.assert_allclose(np.array(native_out.astype(mx.float32)), np.array(reference.astype(mx.float32)),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("d_model", "kernel", "lengths"), [(64, 9, [40]), (36, 31, [29, 3]), (512, 9, [376, 100])])
def test_native_conv_module_matches_the_mlx_layers(d_model: int, kernel: int, lengths: list[int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """GLU, depthwise conv over time (kernels longer than the sequence too), BatchNorm with real statistics and
    SiLU, with the extension and with the MLX code it replaces, alone and in a padded batch."""
    mx.random.seed(kernel)
    module = ConvModule(d_model, kernel, use_bias=True)
    module.batch_norm.update({"running_mean": mx.random.normal((d_model,)),
                              "running_var": mx.random.uniform(0.2, 3.0, (d_model,)),
                              "weight": mx.random.normal((d_model,)), "bias": mx.random.normal((d_model,))})
    module.depthwise_conv.update({"bias": mx.random.normal((d_model,))})
    frames = max(lengths)
    x = mx.random.normal((len(lengths), frames, d_model))
    valid = valid_mask(mx.array(lengths), frames)[:, :, None].astype(x.dtype) if min(lengths) < frames else None
    mx.eval(module.parameters(), x)
    native_out = module(x, valid)
    monkeypatch.setattr(native, "available", lambda: False)
    reference = module(x, valid)
    assert float(mx.abs(reference).max()) > 0.1
    np.testing.assert_allclose(np.array(native_out), np.array(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "width"), [(376, 512), (7, 36), (3, 17)])
def test_native_layer_norm_matches_torchs_definition(rows: int, width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder's LayerNorm against numpy's float64 one (torch's definition: biased variance, eps inside the
    root) on rows with a large common offset, where a one-pass variance loses digits, and widths that leave
    vector remainders (float32 inputs near 100 carry 8e-6 of rounding); MLX's own kernel, the fallback, too."""
    mx.random.seed(width)
    norm = LayerNorm(width, eps=1e-5)
    norm.update({"weight": mx.random.normal((width,)), "bias": mx.random.normal((width,))})
    x = 100.0 + mx.random.normal((2, rows, width))
    mx.eval(norm.parameters(), x)
    values = np.array(x, dtype=np.float64)
    centred = values - values.mean(axis=-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-5) * np.array(norm.weight) + np.array(norm.bias)
    native_out = norm(x)
    assert native_out.shape == x.shape and native_out.dtype == x.dtype
    np.testing.assert_allclose(np.array(native_out), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(native, "available", lambda: False)
    np.testing.assert_allclose(np.array(norm(x)), want, rtol=1e-3, atol=1e-3)
