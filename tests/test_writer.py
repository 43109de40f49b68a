"""The MLX folder on disk: streamed safetensors, shards, dtypes, atomic publication, validation."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from canary_convert.archive import open_archive
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import OutputError, ValidationError
from canary_convert.model.load import INDEX_FILE, weight_files
from canary_convert.validate import check_round_trip, check_strict_load
from canary_convert.writer import staged_output


def _source(path: Path) -> dict[str, torch.Tensor]:
    with open_archive(path) as archive, archive.state_dict() as state:
        return {key: tensor.clone() for key, tensor in state.items()}


def test_single_file_matches_the_plan(checkpoint: Path, tmp_path: Path) -> None:
    conversion = convert(str(checkpoint), tmp_path / "out", ConvertOptions())
    assert conversion.files == ["model.safetensors"]
    source = _source(checkpoint)
    loaded = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(loaded) == {t.target_key for t in conversion.plan.tensors}
    for plan in conversion.plan.tensors:
        expected = plan.convert(source[plan.source_key], torch.float32).numpy()
        assert np.array_equal(np.array(loaded[plan.target_key]), expected), plan.target_key
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="np") as handle:
        assert handle.metadata() == {"format": "mlx"}


def test_shards_and_index_like_mlx_lm(checkpoint: Path, tmp_path: Path) -> None:
    conversion = convert(str(checkpoint), tmp_path / "out", ConvertOptions(max_shard_bytes=100_000))
    out = tmp_path / "out"
    index = json.loads((out / INDEX_FILE).read_text())
    count = len(conversion.files)
    assert count > 2 and conversion.files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == {t.target_key for t in conversion.plan.tensors}
    assert set(index["weight_map"].values()) == set(conversion.files)
    stored = sum(int(np.prod(t.target_shape)) * 4 for t in conversion.plan.tensors)
    assert index["metadata"]["total_size"] == stored
    for file in weight_files(out):
        size = sum(v.nbytes for v in mx.load(str(file)).values())
        # a shard exceeds the limit only when it holds a single tensor larger than the limit
        assert size <= 100_000 or len(mx.load(str(file))) == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_features_in_float32(checkpoint: Path, tmp_path: Path, dtype: str) -> None:
    convert(str(checkpoint), tmp_path / "out", ConvertOptions(dtype=dtype))
    loaded = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert loaded["preprocessor.filterbank"].dtype == mx.float32
    assert loaded["preprocessor.window"].dtype == mx.float32
    assert loaded["encoder.layers.0.self_attn.linear_q.weight"].dtype == getattr(mx, dtype)
    assert loaded["decoder.token_embedding.weight"].dtype == getattr(mx, dtype)


def test_existing_output_is_refused_then_replaced_with_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="exists and is not empty; pass --force"):
        convert(str(checkpoint), out, ConvertOptions())
    assert (out / "keep.txt").read_text() == "precious"
    convert(str(checkpoint), out, ConvertOptions(force=True))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired folder left


def test_failure_inside_staging_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with staged_output(out, force=False) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_tampered_weights_fail_the_round_trip(checkpoint: Path, tmp_path: Path) -> None:
    conversion = convert(str(checkpoint), tmp_path / "out", ConvertOptions())
    source = _source(checkpoint)
    stored = conversion.stored
    file = tmp_path / "out" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # flip a bit of the last tensor's last value
    file.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match="does not transform back to"):
        check_round_trip(tmp_path / "out", stored, source)
    assert ValidationError.exit_code == 3


def test_missing_parameter_fails_the_strict_load(checkpoint: Path, tmp_path: Path) -> None:
    convert(str(checkpoint), tmp_path / "out", ConvertOptions())
    file = tmp_path / "out" / "model.safetensors"
    weights = mx.load(str(file))
    mx.eval(weights)  # read everything before the file is rewritten
    del weights["encoder.layers.1.norm_out.bias"]
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    with pytest.raises(ValidationError, match="does not load strictly"):
        check_strict_load(tmp_path / "out")
