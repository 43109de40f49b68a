"""The model card (README.md in OUT): parsed by huggingface_hub's own ModelCard, with the facts of the conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import run_cli
from hub_cache import seed_cache
from hub_server import commit_id, loopback_env

CARD = "README.md"


@pytest.fixture
def offline_hub(tmp_path: Path, dead_endpoint: str) -> dict[str, str]:
    """An environment whose Hub is a hand-built cache (HF_HUB_OFFLINE) and a refused loopback endpoint."""
    home = tmp_path / "hf-home"
    home.mkdir()
    return loopback_env(home, dead_endpoint, offline=True)


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / CARD)


def test_card_of_a_local_conversion(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(str(checkpoint), str(tmp_path / "tiny-mlx"), "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    card = _card(tmp_path / "tiny-mlx")
    data = card.data.to_dict()
    assert data["library_name"] == "mlx" and data["pipeline_tag"] == "automatic-speech-recognition"
    assert data["language"] == ["en", "de"]  # the aggregate tokenizer's languages, in its order
    assert {"mlx", "canary", "speech", "asr", "canary-1b"} <= set(data["tags"])
    # A local file says nothing of its licence or origin: the card says so instead of inventing one.
    assert data["license"] == "unknown" and "base_model" not in data
    assert "convert again with --license before publishing" in card.text
    record = json.loads((tmp_path / "tiny-mlx" / "conversion.json").read_text())
    assert f"canary-convert {checkpoint} tiny-mlx --dtype float16" in card.text
    assert record["source"]["sha256"].removeprefix("sha256:") in card.text
    assert f"{record['parameter_count']:,}" in card.text and "float16 weights" in card.text
    assert f"{record['validation']['parameters']} parameter arrays" in card.text
    assert "Not run for this folder" in card.text  # no --parity
    assert "canary-transcribe speech.wav --model tiny-mlx --source-lang en" in card.text
    assert CARD in record["manifest"]  # the card is part of what the manifest protects


def test_card_of_a_quantized_hub_conversion(checkpoint: Path, tmp_path: Path, offline_hub: dict[str, str]) -> None:
    # The source's own card names its licence; a quantized conversion says what it is quantized from.
    commit = commit_id("card")
    home = Path(offline_hub["HF_HOME"])
    seed_cache(home, "someone/tiny-canary", "tiny-canary.nemo", checkpoint.read_bytes(), commit)
    seed_cache(home, "someone/tiny-canary", CARD, b"---\nlicense: apache-2.0\n---\n# tiny\n", commit)
    result = run_cli("someone/tiny-canary", str(tmp_path / "q8"), "--quantize", "8", "--q-group-size", "32",
                     env=offline_hub)
    assert result.returncode == 0, result.stderr
    card = _card(tmp_path / "q8")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and "the model card of someone/tiny-canary" in card.text
    assert data["base_model"] == "someone/tiny-canary" and data["base_model_relation"] == "quantized"
    assert f"commit `{commit}`" in card.text
    assert "8-bit affine quantized Linear and Embedding layers (group size 32, float32 scales)" in card.text
    assert "| layer | relative L2 | max abs |" in card.text


def test_nvidia_licences_without_the_source_card(checkpoint: Path, tmp_path: Path, offline_hub: dict[str, str]) -> None:
    # canary-1b is CC-BY-NC-4.0: the presets know NVIDIA's releases when their card cannot be read.
    seed_cache(Path(offline_hub["HF_HOME"]), "nvidia/canary-1b", "canary-1b.nemo", checkpoint.read_bytes(),
               commit_id("nvidia"))
    result = run_cli("nvidia/canary-1b", str(tmp_path / "out"), env=offline_hub)
    assert result.returncode == 0, result.stderr
    card = _card(tmp_path / "out")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == "nvidia/canary-1b"
    assert "NVIDIA's licence for nvidia/canary-1b" in card.text


def test_license_and_base_model_flags(checkpoint: Path, tmp_path: Path) -> None:
    shutil.copy(checkpoint, tmp_path / "canary-180m-flash.nemo")
    result = run_cli(str(tmp_path / "canary-180m-flash.nemo"), str(tmp_path / "out"), "--license", "cc-by-4.0",
                     "--base-model", "nvidia/canary-180m-flash")
    assert result.returncode == 0, result.stderr
    card = _card(tmp_path / "out")
    assert card.data.license == "cc-by-4.0" and card.data.base_model == "nvidia/canary-180m-flash"
    assert "given with --license" in card.text and "--license cc-by-4.0 --base-model nvidia/canary-180m-flash" in card.text


def test_card_carries_the_parity_table(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli(str(checkpoint), str(tmp_path / "out"), "--parity")
    assert result.returncode == 0, result.stderr
    text = _card(tmp_path / "out").text
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert "| encoder rel L2, batch |" in text and f"{record['parity']['encoder_rel_l2_batch']:.2e}" in text
    assert "| greedy token ids | identical | identical | ok |" in text
