"""The `_encoder` extension's kernels give what the MLX code they replace gives.

NeMo parity of the whole encoder is tests/test_parity.py's (it runs these kernels on Linux); here the subsampling's
convolutions are held against the MLX layers they replace on shapes the tiny checkpoints do not reach: odd lengths and widths,
several channel counts (vector remainders), factors 4 to 16, padded batches with a sequence of one frame.
"""

from __future__ import annotations

import platform

import mlx.core as mx
import numpy as np
import pytest

from canary_convert.extensions import extension_path
from canary_convert.model.config import EncoderConfig
from canary_convert.model.cpu import native
from canary_convert.model.fastconformer.encoder import ConvSubsampling

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
