"""Absurd numbers in a checkpoint's model_config.yaml (or a folder's config.json) are refused by key, in one
line, before any model is built; the limits are those of canary_convert.model.config."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from canary_convert.archive import CONFIG_MEMBER, WEIGHTS_MEMBER
from canary_convert.convert import ConvertOptions, plan_only
from canary_convert.errors import ModelFolderError, UnsupportedModelError
from canary_convert.model.config import MAX_BEAM, MAX_CONFIG_INT, MAX_LAYERS, MAX_WIDTH, ModelConfig
from conftest import run_cli


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name.removeprefix("./"): tar.extractfile(info).read() for info in tar if info.isfile()}


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _with_config_value(checkpoint: Path, target: Path, dotted: str, value: Any) -> Path:
    members = _members(checkpoint)
    config = yaml.safe_load(members[CONFIG_MEMBER])
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    members[CONFIG_MEMBER] = yaml.safe_dump(config).encode()
    return _write_tar(target, members)


WHOLE = f"is not a whole number within +-{MAX_CONFIG_INT}"


@pytest.mark.parametrize(("dotted", "value", "problem", "field"), [
    ("encoder.d_model", 10**9, f"1000000000 {WHOLE}", "encoder.d_model"),
    ("encoder.d_model", "128", f"'128' {WHOLE}", "encoder.d_model"),
    ("encoder.d_model", 128.5, f"128.5 {WHOLE}", "encoder.d_model"),
    ("encoder.d_model", True, f"True {WHOLE}", "encoder.d_model"),
    ("encoder.n_heads", 0, f"0 is outside 1..{MAX_WIDTH}", "encoder.n_heads"),
    ("encoder.n_heads", 5, "5 does not divide d_model 48", "encoder.n_heads"),
    ("encoder.n_layers", 5000, f"5000 is outside 1..{MAX_LAYERS}", "encoder.n_layers"),
    ("transf_decoder.config_dict.num_attention_heads", 0, f"0 is outside 1..{MAX_WIDTH}",
     "decoder.num_attention_heads"),
    ("transf_decoder.config_dict.num_layers", -1, f"-1 is outside 1..{MAX_LAYERS}", "decoder.num_layers"),
    ("preprocessor.window_size", 1e9, f"1000000000.0 is not a finite number within +-{MAX_CONFIG_INT}",
     "preprocessor.window_size"),
    ("preprocessor.window_size", 30.0, f"30.0 s at 16000 Hz is 480000 samples, outside 1..{MAX_WIDTH}",
     "preprocessor.window_size"),
    ("preprocessor.features", -3, f"-3 is outside 1..{MAX_WIDTH}", "preprocessor.features"),
    ("decoding.beam.beam_size", 10**6, f"1000000 is outside 1..{MAX_BEAM}", "decoding.beam_size"),
])
def test_absurd_config_number_is_refused_by_key(checkpoint: Path, tmp_path: Path, dotted: str, value: Any,
                                                problem: str, field: str) -> None:
    source = _with_config_value(checkpoint, tmp_path / "m.nemo", dotted, value)
    started = time.monotonic()
    with pytest.raises(UnsupportedModelError) as raised:
        plan_only(str(source), ConvertOptions())
    assert str(raised.value) == f"model_config.yaml: {dotted}: {problem} (config.json {field})"
    assert time.monotonic() - started < 30


def test_empty_vocabulary_is_refused_by_tensor(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    state = torch.load(io.BytesIO(members[WEIGHTS_MEMBER]), weights_only=True)
    key = "transf_decoder._embedding.token_embedding.weight"
    state[key] = state[key][:0]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    members[WEIGHTS_MEMBER] = buffer.getvalue()
    with pytest.raises(UnsupportedModelError) as raised:
        plan_only(str(_write_tar(tmp_path / "m.nemo", members)), ConvertOptions())
    assert str(raised.value) == (f"tensor {key}: its shape gives config.json decoder.vocab_size: "
                                 f"0 is outside 1..{MAX_CONFIG_INT}")


def test_absurd_config_number_exits_1_in_one_line_leaving_nothing(checkpoint: Path, tmp_path: Path) -> None:
    source = _with_config_value(checkpoint, tmp_path / "m.nemo", "encoder.d_model", 10**9)
    result = run_cli(str(source), str(tmp_path / "mlx"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: model_config.yaml: encoder.d_model: 1000000000 {WHOLE} "
                                     f"(config.json encoder.d_model)")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.nemo"]


def test_folder_config_json_with_absurd_number_names_file_and_key(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    assert run_cli(str(checkpoint), str(out)).returncode == 0
    config = json.loads((out / "config.json").read_text())
    config["decoder"]["num_attention_heads"] = 0
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError) as raised:
        ModelConfig.from_file(out / "config.json")
    assert str(raised.value) == f"{out / 'config.json'}: decoder.num_attention_heads: 0 is outside 1..{MAX_WIDTH}"
