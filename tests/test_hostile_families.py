"""Every family's folder is untrusted input too (issue 16 for the heads that came after it): a weight of any
head changed behind the manifest, or goldens that leave a model of the folder out, never pass `verify`.

Each case changes the weights the way an attacker would, re-recording the file's manifest entry, so only the
goldens can catch it: the transducer's prediction network and joint, a hybrid's CTC head (in the own and the
parakeet-mlx layout), a CTC model's head, canary-1b-v2's aligner, and canary-qwen's projection and LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

import salm_factory
import transducer_factory
from canary_convert.convert import ConvertOptions, convert
from canary_convert.goldens import GOLDENS_FILE, goldens_digest
from canary_convert.verify import verify_folder
from conftest import copy_folder, rerecord
from factory import ALIGNER, CTC_VARIANTS, VARIANTS, build, build_ctc, with_aligner


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One converted folder per family kind, each from a tiny checkpoint built with NeMo's own classes."""
    nemo = tmp_path_factory.mktemp("nemo-families")
    out = tmp_path_factory.mktemp("mlx-families")
    hybrid = transducer_factory.build(transducer_factory.VARIANTS["tdt-ctc-80"], nemo / "tdt-ctc.nemo")
    v2 = with_aligner(build(VARIANTS["canary2-bpe-sub16"], nemo / "canary.nemo"),
                      build_ctc(ALIGNER, nemo / "aligner.nemo"), nemo / "v2.nemo")
    sources = {"tdt-ctc": hybrid, "ctc": build_ctc(CTC_VARIANTS["ctc-sub4"], nemo / "ctc.nemo"), "v2": v2,
               "salm": salm_factory.build(salm_factory.VARIANTS["salm-tied-r8"], nemo / "salm")[0]}
    converted = {name: convert(str(source), out / name, ConvertOptions()).out for name, source in sources.items()}
    converted["tdt-ctc parakeet-mlx"] = convert(str(hybrid), out / "pmlx", ConvertOptions(layout="parakeet-mlx")).out
    return converted


def _scale(folder: Path, file: str, prefix: str) -> list[str]:
    """Every float tensor of `file` whose name starts with `prefix` scaled by 1.5, the manifest re-recorded."""
    weights = dict(mx.load(str(folder / file)))
    changed = [key for key in weights if key.startswith(prefix) and mx.issubdtype(weights[key].dtype, mx.floating)]
    weights.update({key: weights[key] * 1.5 for key in changed})
    mx.save_safetensors(str(folder / file), weights, metadata={"format": "mlx"})
    rerecord(folder, file)
    return changed


@pytest.mark.parametrize(("family", "file", "prefix", "failing"), [
    ("tdt-ctc", "model.safetensors", "prediction.", "test-signals: logprobs"),
    ("tdt-ctc", "model.safetensors", "joint.", "test-signals: logprobs"),
    ("tdt-ctc", "model.safetensors", "ctc.", "test-signals: logprobs"),
    ("tdt-ctc parakeet-mlx", "model.safetensors", "ctc_decoder.", "test-signals: logprobs"),
    ("tdt-ctc parakeet-mlx", "model.safetensors", "joint.", "test-signals: logprobs"),
    ("ctc", "model.safetensors", "decoder.", "test-signals: logprobs"),
    ("v2", "aligner/model.safetensors", "decoder.", "aligner: test-signals: logprobs"),
    ("salm", "model.safetensors", "projection.", "goldens"),
    ("salm", "llm/model.safetensors", "model.layers.0.", "goldens"),
], ids=["transducer-prediction", "transducer-joint", "hybrid-ctc", "parakeet-mlx-ctc", "parakeet-mlx-joint",
        "ctc-head", "v2-aligner-head", "salm-projection", "salm-llm"])
def test_a_changed_head_never_passes(folders: dict[str, Path], tmp_path: Path, family: str, file: str, prefix: str,
                                     failing: str) -> None:
    folder = copy_folder(folders[family], tmp_path)
    assert _scale(folder, file, prefix)
    report = verify_folder(folder, str(folder), "cpu")
    assert report.exit_code == 3
    assert failing in {check.name for check in report.checks if check.status == "fail"}, report.checks


def test_goldens_without_a_model_of_the_folder_fail(folders: dict[str, Path], tmp_path: Path) -> None:
    """canary-1b-v2's goldens with the aligner's part taken out (digest and manifest re-recorded), and the
    aligner's head changed: the aligner is loaded, so its missing goldens are a failure, not a skip."""
    folder = copy_folder(folders["v2"], tmp_path)
    _scale(folder, "aligner/model.safetensors", "decoder.")
    goldens = json.loads((folder / GOLDENS_FILE).read_text())
    del goldens["parts"]
    goldens["digest"] = goldens_digest(goldens)
    (folder / GOLDENS_FILE).write_text(json.dumps(goldens))
    rerecord(folder, GOLDENS_FILE)
    report = verify_folder(folder, str(folder), "cpu")
    assert report.exit_code == 3
    assert [(check.name, check.status) for check in report.checks if check.status != "pass"] == [
        ("aligner: goldens", "fail")]
