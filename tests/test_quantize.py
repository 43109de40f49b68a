"""--quantize: MLX-quantized Linear/Embedding layers, loaded strictly, proven exact, and measured against NeMo."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import ValidationError
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.parity import compare_stages, reference_signals, restore_nemo, run_parity
from canary_convert.validate import check_round_trip
from conftest import run_cli
from factory import QUANTIZABLE_VARIANTS, VARIANTS


def _nemo_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's own weights, read with torch alone."""
    with tarfile.open(path) as tar:
        return torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)


@pytest.fixture(scope="module")
def sources(checkpoints: dict[str, Path], quantizable_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return {**checkpoints, **quantizable_checkpoints}


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **QUANTIZABLE_VARIANTS}))
@pytest.mark.parametrize("bits", [4, 8])
def test_every_variant_quantizes_loads_strictly_and_transcribes(sources: dict[str, Path], tmp_path: Path,
                                                                variant: str, bits: int) -> None:
    # The odd widths of the first variants only divide by 32; the w64 ones quantize every layer at 64.
    group = 64 if variant in QUANTIZABLE_VARIANTS else 32
    conversion = convert(str(sources[variant]), tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.create(bits, group)))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert {key: config["quantization"][key] for key in ("bits", "group_size", "mode")} == \
        {"bits": bits, "group_size": group, "mode": "affine"}
    state = _nemo_state(sources[variant])
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    quantized = conversion.quantization.quantized
    kept = {path for path, value in config["quantization"].items() if value is False}
    # Every Linear/Embedding weight of the MLX model is quantized exactly when its input width divides by the group.
    for plan in conversion.plan.tensors:
        if plan.target_key.endswith(".weight") and plan.target_key[:-7] in quantized | kept:
            path = plan.target_key[:-7]
            assert (path in quantized) == (plan.target_shape[-1] % group == 0), path
            assert (f"{path}.scales" in stored) == (path in quantized), path
    if variant in QUANTIZABLE_VARIANTS:
        assert quantized and not kept
    # A quantized layer holds exactly MLX's own quantization of the checkpoint's tensor.
    if quantized:
        path = sorted(quantized)[0]
        source_key = next(p.source_key for p in conversion.plan.tensors if p.target_key == f"{path}.weight")
        weight = mx.array(state[source_key].float().numpy())
        expected = mx.quantize(weight, group_size=group, bits=bits)
        assert stored[f"{path}.weight"].dtype == mx.uint32
        assert all(mx.array_equal(stored[f"{path}.{part}"], value).item()
                   for part, value in zip(("weight", "scales", "biases"), expected))
    model = load_model(tmp_path / "q")
    quantized_layers = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    assert any(isinstance(module, quantized_layers) for _, module in model.named_modules()) == bool(quantized)
    result = model.transcribe(reference_signals(16000)[:2], strategy="greedy")
    assert len(result) == 2 and all(r.tokens for r in result)
    record = json.loads((tmp_path / "q" / "conversion.json").read_text())
    errors = record["validation"].get("quantization_errors", [])
    assert sorted(e["key"][:-7] for e in errors) == sorted(quantized)
    assert [e["rel_l2"] for e in errors] == sorted((e["rel_l2"] for e in errors), reverse=True)
    if errors:  # 4 bits keep about one part in 10 of a random weight, 8 bits about one in 150
        assert 0 < errors[0]["rel_l2"] < (0.15 if bits == 4 else 0.01)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_floating_point_modes(quantizable_checkpoints: dict[str, Path], tmp_path: Path, mode: str) -> None:
    bits = 8 if mode == "mxfp8" else 4
    convert(str(quantizable_checkpoints["canary2-bpe-w64"]), tmp_path / "q",
            ConvertOptions(quantize=QuantizeOptions.create(bits, mode=mode)))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["mode"] == mode
    assert config["quantization"]["group_size"] == (16 if mode == "nvfp4" else 32)
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert stored["decoder.blocks.0.mlp1.scales"].dtype == mx.uint8
    assert not any(key.endswith(".biases") for key in stored)  # shared exponents, no affine offsets
    assert load_model(tmp_path / "q").transcribe(reference_signals(16000)[0], strategy="greedy")[0].tokens


def test_scales_keep_the_chosen_float_dtype(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    convert(str(quantizable_checkpoints["canary2-bpe-proj-w64"]), tmp_path / "q",
            ConvertOptions(dtype="bfloat16", quantize=QuantizeOptions.create(8)))
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert stored["encoder_decoder_proj.scales"].dtype == mx.bfloat16
    assert stored["encoder.layers.0.norm_out.weight"].dtype == mx.bfloat16
    assert stored["preprocessor.filterbank"].dtype == mx.float32  # the front end stays float32
    assert stored["encoder.layers.0.conv.depthwise_conv.weight"].dtype == mx.bfloat16  # convolutions stay float


@pytest.mark.parametrize("variant", sorted(QUANTIZABLE_VARIANTS))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_stages_against_nemo(quantizable_checkpoints: dict[str, Path], tmp_path: Path, variant: str,
                                       bits: int) -> None:
    convert(str(quantizable_checkpoints[variant]), tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.create(bits)))
    report = compare_stages(restore_nemo(quantizable_checkpoints[variant]), load_model(tmp_path / "q"),
                            reference_signals(16000))
    assert report.passed, report.failures
    assert report.dtype == f"{bits}-bit affine (group 64), float32"
    assert report.features_max_abs <= 1e-3  # the front end is never quantized
    # Quantization error is real but bounded: well above float32 rounding, within the documented limits.
    assert 1e-4 < report.encoder_rel_l2_batch <= report.thresholds.encoder_rel_l2
    assert 1e-3 < report.logprobs_max_abs <= report.thresholds.logprobs_max_abs


def test_parity_of_an_8bit_folder(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = quantizable_checkpoints["canary2-bpe-w64"]
    convert(str(source), tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.create(8)))
    report = run_parity(source, load_model(tmp_path / "q"))
    assert report.thresholds.tokens_identical and set(report.tokens) == {"greedy", "beam4"}


def test_a_tampered_scale_fails_the_round_trip(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = quantizable_checkpoints["canary2-bpe-w64"]
    conversion = convert(str(source), tmp_path / "q", ConvertOptions(quantize=QuantizeOptions.create(4)))
    file = tmp_path / "q" / "model.safetensors"
    weights = dict(mx.load(str(file)))
    scales = np.array(weights["decoder.blocks.0.mlp2.scales"])
    scales[0, 0] *= 1.001
    weights["decoder.blocks.0.mlp2.scales"] = mx.array(scales)
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    with pytest.raises(ValidationError, match="decoder.blocks.0.mlp2.scales is not mx.quantize of transf_decoder"):
        check_round_trip(tmp_path / "q", conversion.stored, _nemo_state(source), conversion.quantization)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "3"], "--quantize 3: choose 4 or 8 bits"),
        (["--quantize", "4", "--q-group-size", "48"], "affine quantization takes group sizes 32, 64, 128, not 48"),
        (["--quantize", "4", "--q-mode", "mxfp4", "--q-group-size", "64"],
         "mxfp4 quantizes to 4 bits in groups of 32, not 4 bits in groups of 64"),
        (["--quantize", "8", "--q-mode", "nvfp4"], "nvfp4 quantizes to 4 bits in groups of 16"),
        (["--q-group-size", "32"], "--q-group-size and --q-mode need --quantize 4 or 8"),
        (["--quantize", "4", "--q-mode", "fp3"], "quantization mode 'fp3': choose one of affine, mxfp4, mxfp8, nvfp4"),
    ],
)
def test_bad_quantization_options_are_usage_errors(checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(str(checkpoint), str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr.replace("\n", " "), result.stderr
    assert not (tmp_path / "out").exists()


def test_the_summary_names_the_worst_layers(quantizable_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli(str(quantizable_checkpoints["canary2-bpe-w64"]), str(tmp_path / "out"), "--quantize", "4")
    assert result.returncode == 0, result.stderr
    assert "4-bit affine (group 64): 40 layers quantized, 0 kept in float" in result.stdout
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    worst = record["validation"]["quantization_errors"][0]
    assert f"  {worst['key']}: {worst['rel_l2']:.2e}" in result.stdout
    assert record["options"]["quantize"] == {"group_size": 64, "bits": 4, "mode": "affine"}
