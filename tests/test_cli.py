"""`canary-convert` end to end, as a user runs it: exit codes, messages, files, provenance."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from canary_convert import load_model
from canary_convert.rules import load_rules
from conftest import REPO, run_cli
from factory import TinySpec, build


def _retar(source: Path, target: Path, edit_state) -> Path:
    """Copy a .nemo with its weights edited (tests of keys and shapes the mapping must refuse)."""
    with tarfile.open(source) as tar_in, tarfile.open(target, "w") as tar_out:
        for info in tar_in:
            data = tar_in.extractfile(info).read() if info.isfile() else None
            if info.name.endswith("model_weights.ckpt"):
                state = torch.load(io.BytesIO(data), weights_only=True)
                edit_state(state)
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
                info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data) if data is not None else None)
    return target


@pytest.mark.parametrize("variant", ["canary-sub8", "canary2-proj-sub4", "canary2-bpe-sub16"])
def test_converts_every_variant(checkpoints: dict[str, Path], tmp_path: Path, variant: str) -> None:
    source, out = checkpoints[variant], tmp_path / "mlx"
    result = run_cli(str(source), str(out))
    assert result.returncode == 0, result.stderr
    assert "strict load ok, round trip exact" in result.stdout
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"]["kind"] == "file"
    assert record["source"]["sha256"] == "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["mapping"]["digest"] == load_rules("canary.yaml").digest
    assert record["converter"]["version"] == "0.1.0"
    assert record["options"]["dtype"] == "float32"
    assert record["validation"]["strict_load"] == "ok" and record["validation"]["round_trip"] == "exact"
    config = json.loads((out / "config.json").read_text())
    tokenizer_files = list(config["tokenizer"]["langs"].values()) or [config["tokenizer"]["model"]]
    assert all((out / path).is_file() for path in tokenizer_files)
    model = load_model(out)  # strict: every parameter present with its shape
    assert model.config.family == record["family"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "conversion.json", "goldens.json",
                                                   "model.safetensors", "tokenizer"]


def test_dry_run_prints_the_whole_plan_and_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(str(checkpoint), str(tmp_path / "mlx"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "mlx").exists()
    with tarfile.open(checkpoint) as tar:
        state = torch.load(tar.extractfile("./model_weights.ckpt"), weights_only=True)
    flat = result.stdout.replace("\n", " ")
    for key in state:
        assert key in flat, key
    assert "conv2d (O,I,H,W)->(O,H,W,I)" in flat and "dropped" in flat and "dry run: nothing written" in flat


def test_dry_run_needs_no_out(checkpoint: Path) -> None:
    assert run_cli(str(checkpoint), "--dry-run").returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing/dir/model.nemo", "OUT"], 1, "missing/dir/model.nemo: no such file or folder"),
        (["{ckpt}", "{out}", "--dtype", "float8"], 2, "--dtype 'float8'"),
        (["{ckpt}"], 2, "missing OUT"),
        (["{ckpt}", "{out}", "--max-shard-size", "lots"], 2, "--max-shard-size 'lots'"),
        (["{ckpt}", "{out}", "--bogus"], 2, "No such option"),
    ],
)
def test_usage_and_source_errors(checkpoint: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = run_cli(*[a.format(ckpt=checkpoint, out=tmp_path / "mlx") for a in args])
    assert result.returncode == code
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "mlx").exists()


def test_corrupt_archive_exits_1_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(os.urandom(4096))
    result = run_cli(str(bad), str(tmp_path / "mlx"))
    assert result.returncode == 1
    assert f"{bad}: not a readable .nemo archive" in " ".join(result.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nemo"]


def test_unknown_key_exits_1_and_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    edited = _retar(checkpoint, tmp_path / "extra.nemo", lambda s: s.update({"encoder.mystery": torch.ones(2)}))
    result = run_cli(str(edited), str(tmp_path / "mlx"))
    assert result.returncode == 1
    assert "no rule in canary.yaml for source key(s) encoder.mystery" in " ".join(result.stderr.split())
    assert not (tmp_path / "mlx").exists()


def test_wrong_shape_exits_1_naming_the_key(checkpoint: Path, tmp_path: Path) -> None:
    key = "transf_decoder._decoder.layers.0.third_sub_layer.dense_in.weight"
    edited = _retar(checkpoint, tmp_path / "shape.nemo", lambda s: s.update({key: s[key][:, :-2]}))
    result = run_cli(str(edited), str(tmp_path / "mlx"))
    assert result.returncode == 1
    assert f"{key} -> decoder.blocks.0.mlp1.weight: shape" in " ".join(result.stderr.split())
    assert not (tmp_path / "mlx").exists()


def test_existing_out_exits_1_untouched(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli(str(checkpoint), str(out))
    assert result.returncode == 1 and "pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run_cli(str(checkpoint), str(out), "--force").returncode == 0


def test_unreachable_hub_says_how_to_pass_a_file(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = run_cli("nvidia/canary-1b", str(tmp_path / "mlx"), env=env)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "nvidia/canary-1b/canary-1b.nemo: the Hugging Face Hub cannot be reached" in message
    assert "canary-convert ./canary-1b.nemo OUT" in message


def test_sigterm_mid_conversion_leaves_nothing(tmp_path: Path) -> None:
    # Big enough (about 60 MB of weights) that the conversion is still running when the signal lands.
    source = build(TinySpec("sigterm", d_model=512, enc_layers=6, dec_hidden=512, dec_layers=2, enc_heads=8,
                            dec_heads=8, conv_channels=64, features=64), tmp_path / "big.nemo")
    out = tmp_path / "mlx"
    process = subprocess.Popen([str(Path(os.sys.executable).parent / "canary-convert"), str(source), str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mlx.partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the conversion finished before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nemo"]


def test_help_lists_every_command_with_plain_flags() -> None:
    """A newcomer's `--help`: every command named, flags as `--force` and `--pnc / --no-pnc`, never `<bool>`."""
    main = run_cli("--help")
    assert main.returncode == 0
    assert "canary-convert verify " in main.stdout and "canary-convert upload " in main.stdout
    assert "  --force " in main.stdout and "  --parity " in main.stdout
    for command in ("verify", "upload"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and f"Usage: canary-convert {command}" in result.stdout
        assert "<bool>" not in result.stdout
    transcribe = subprocess.run([str(Path(sys.executable).parent / "canary-transcribe"),
                                 "--help"], capture_output=True, text=True, timeout=120)
    assert transcribe.returncode == 0 and "--pnc / --no-pnc" in transcribe.stdout
    assert all("<bool>" not in text for text in (main.stdout, transcribe.stdout))
