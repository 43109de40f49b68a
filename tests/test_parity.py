"""The converted MLX model against NeMo, stage by stage, on every tiny variant and dtype."""

from __future__ import annotations

from pathlib import Path

import pytest

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.parity import compare_stages, restore_nemo, reference_signals
from factory import VARIANTS


@pytest.fixture(scope="module")
def nemo_models(checkpoints: dict[str, Path]) -> dict[str, object]:
    return {name: restore_nemo(path) for name, path in checkpoints.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stages_match_nemo(checkpoints: dict[str, Path], nemo_models: dict, tmp_path: Path, variant: str, dtype: str) -> None:
    convert(str(checkpoints[variant]), tmp_path / "mlx", ConvertOptions(dtype=dtype))
    model = load_model(tmp_path / "mlx")
    report = compare_stages(nemo_models[variant], model, reference_signals(16000))
    assert report.passed, report.failures
    limits = report.thresholds
    assert report.features_max_abs <= 1e-3
    assert report.encoder_rel_l2_single <= limits.encoder_rel_l2 and report.encoder_rel_l2_batch <= limits.encoder_rel_l2
    if dtype == "float32":
        assert report.encoder_rel_l2_batch <= 1e-4 and report.logprobs_max_abs <= 1e-3


def test_a_wrong_weight_fails_parity(checkpoints: dict[str, Path], nemo_models: dict, tmp_path: Path) -> None:
    convert(str(checkpoints["canary-sub8"]), tmp_path / "mlx", ConvertOptions())
    model = load_model(tmp_path / "mlx")
    layer = model.encoder.layers[1].conv.batch_norm
    layer.running_var = layer.running_var * 1.01  # a 1% error in one BatchNorm statistic
    report = compare_stages(nemo_models["canary-sub8"], model, reference_signals(16000))
    assert not report.passed
    assert any(failure.startswith("encoder relative L2") for failure in report.failures)
