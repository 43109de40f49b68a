"""Half-precision and quantized layers multiplied in float32 give MLX's own kernels' values, and loading a
half or quantized folder on an x86 CPU puts them in place."""

from __future__ import annotations

import platform
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from canary_convert import load_model
from canary_convert.extensions import extension_path
from canary_convert.model.cpu.activations import attention, product, slow_cpu
from canary_convert.model.cpu.mapped import MappedTensor, Widener, widened
from canary_convert.model.cpu.widened import (
    WidenedEmbedding,
    WidenedLinear,
    WidenedQuantizedEmbedding,
    WidenedQuantizedLinear,
    widen_products,
)
from conftest import run_cli

pytestmark = pytest.mark.skipif(platform.machine().lower() in ("arm64", "aarch64"),
                                reason="the widening concerns MLX's x86 CPU kernels")


def _close(got: mx.array, want: mx.array, dtype: mx.Dtype) -> None:
    """Equal up to the rounding of one result in `dtype` (the sums run in float32 either way)."""
    assert got.dtype == want.dtype
    tolerance = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2, mx.float32: 1e-5}[dtype]
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                               rtol=tolerance, atol=tolerance)


def _model(dtype: mx.Dtype, quantize: int | None) -> nn.Module:
    """A Linear with a bias and an Embedding, in `dtype`, quantized to `quantize` bits when given."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(128, 96), nn.Embedding(80, 128))
    model.set_dtype(dtype)
    if quantize:
        nn.quantize(model, group_size=64, bits=quantize)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_half_layers_widened_equal_mlx_kernels(dtype: mx.Dtype, rows: int) -> None:
    model = _model(dtype, None)
    linear, embedding = model.layers
    x = mx.random.normal((1, rows, 128)).astype(dtype)
    want = (linear(x), embedding.as_linear(x))
    widen_products(model)
    assert type(model.layers[0]) is WidenedLinear and type(model.layers[1]) is WidenedEmbedding
    _close(model.layers[0](x), want[0], dtype)
    _close(model.layers[1].as_linear(x), want[1], dtype)
    assert mx.array_equal(model.layers[1](mx.array([3, 7])), embedding(mx.array([3, 7]))).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_layers_dequantized_equal_mlx_kernels(bits: int, rows: int) -> None:
    model = _model(mx.float32, bits)
    linear, embedding = model.layers
    x = mx.random.normal((1, rows, 128))
    want = (linear(x), embedding.as_linear(x))
    widen_products(model)
    assert type(model.layers[0]) is WidenedQuantizedLinear and type(model.layers[1]) is WidenedQuantizedEmbedding
    got = (model.layers[0](x), model.layers[1].as_linear(x))
    for value, reference in zip(got, want):
        if rows == 1:  # a matrix-vector product stays MLX's own kernel
            assert mx.array_equal(value, reference).item()
        else:
            _close(value, reference, mx.float32)


def test_float32_layers_are_left_alone() -> None:
    model = _model(mx.float32, None)
    widen_products(model)
    assert [type(layer) for layer in model.layers] == [nn.Linear, nn.Embedding]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_attention_and_products_are_float32_inside(dtype: mx.Dtype) -> None:
    assert slow_cpu()
    q, k, v = (mx.random.normal((1, 2, 7, 16)).astype(dtype) for _ in range(3))
    mask = mx.where(mx.arange(7) < 5, 0.0, -10000.0).astype(dtype)
    got = attention(q, k, v, 16**-0.5, mask)
    assert got.dtype == dtype
    scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * 16**-0.5 + mask
    want = (mx.softmax(scores, axis=-1) @ v.astype(mx.float32)).astype(dtype)
    _close(got, want, dtype)
    assert product(q, k.swapaxes(-1, -2)).dtype == mx.float32


@pytest.mark.parametrize(
    ("options", "replaced"),
    [(["--dtype", "float16"], (nn.Linear, nn.Embedding)), (["--quantize", "8"], (nn.QuantizedLinear, nn.QuantizedEmbedding))],
)
def test_loaded_half_and_quantized_folders_use_the_widened_layers(
    quantizable_checkpoints: dict[str, Path], tmp_path: Path, options: list[str], replaced: tuple[type, ...]
) -> None:
    checkpoint = next(iter(quantizable_checkpoints.values()))
    result = run_cli(str(checkpoint), str(tmp_path / "mlx"), *options)
    assert result.returncode == 0, result.stderr
    model = load_model(tmp_path / "mlx")
    kinds = {type(module) for _, module in model.named_modules()}
    assert kinds & {WidenedLinear, WidenedEmbedding, WidenedQuantizedLinear, WidenedQuantizedEmbedding}
    assert not kinds & set(replaced)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_widening_on_copy_is_exact_for_every_half_value(dtype: mx.Dtype) -> None:
    """The streamed goldens widen half-precision product weights as they copy them in (model/mapped.py):
    every one of the 65536 bit patterns gives what MLX's own cast gives (NaNs stay NaN)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    tensor = MappedTensor(bits.view(np.float16) if dtype == mx.float16 else bits, dtype)
    ours = np.array(Widener()(tensor))
    theirs = np.array(tensor.load().astype(mx.float32))
    nan = np.isnan(theirs)
    assert ours.dtype == np.float32 and np.array_equal(np.isnan(ours), nan) and nan.sum() > 0
    assert np.array_equal(ours.view(np.uint32)[~nan], theirs.view(np.uint32)[~nan])


def test_float16_widening_uses_the_built_extension() -> None:
    if platform.system() == "Linux":
        assert extension_path("_widen") is not None, "the _widen extension was not built (no C compiler?)"
    # The extension and numpy's fallback agree on random weights, reusing the same buffer.
    weights = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float16)
    out = np.empty(weights.shape, dtype=np.float32)
    assert widened(weights, mx.float16, out) is out
    assert np.array_equal(out, weights.astype(np.float32))
