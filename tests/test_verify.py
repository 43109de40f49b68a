"""`canary-convert verify`: golden outputs recorded at conversion, checked from the folder alone."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path
from xml.etree import ElementTree

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
import yaml

from canary_convert.convert import ConvertOptions, convert
from canary_convert import load_model
from canary_convert.goldens import (GOLDENS_FILE, SCHEMA_VERSION, decode_prompts, gaps, golden_modes,
                                     golden_prompts, goldens_digest, run_group)
from canary_convert.model.quantized import QuantizeOptions
from canary_convert.parity import reference_signals
from canary_convert.verify import REPORT_SCHEMA_FILE, verify_folder
from conftest import REPO, copy_folder, rerecord, run_cli
from factory import QUANTIZABLE_VARIANTS, VARIANTS
from hub_cache import seed_cache
from hub_server import commit_id, loopback_env

SCHEMA = json.loads((resources.files("canary_convert.schemas") / REPORT_SCHEMA_FILE).read_text())
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fresh conversion; tests that damage it work on copies."""
    return convert(str(checkpoint), tmp_path_factory.mktemp("verify") / "mlx", ConvertOptions()).out


def _edit_weights(folder: Path, edit) -> None:
    weights = dict(mx.load(str(folder / WEIGHTS)))
    edit(weights)
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "mlx"})
    rerecord(folder, WEIGHTS)


def _verify(folder: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """The CLI's exit code, its JSON report (checked against the shipped schema) and its terminal output."""
    report = tmp_path / "report.json"
    result = run_cli("verify", str(folder), "--json", str(report), *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(report.read_text()) if report.exists() else {}
    if data:
        jsonschema.validate(data, SCHEMA)
    return result.returncode, data, result.stdout + result.stderr


def _status(report: dict) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


def _failed(report: dict) -> list[dict]:
    return [check for check in report["checks"] if check["status"] == "fail"]


@pytest.mark.parametrize("variant", sorted({**VARIANTS, **QUANTIZABLE_VARIANTS}))
def test_fresh_conversions_verify(checkpoints: dict[str, Path], quantizable_checkpoints: dict[str, Path],
                                  tmp_path: Path, variant: str) -> None:
    source = {**checkpoints, **quantizable_checkpoints}[variant]
    precisions = {"float32": ConvertOptions(), "8-bit": ConvertOptions(quantize=QuantizeOptions.create(8, 32))}
    if variant in QUANTIZABLE_VARIANTS:
        precisions["4-bit float16"] = ConvertOptions(dtype="float16", quantize=QuantizeOptions.create(4))
    for name, options in precisions.items():
        folder = convert(str(source), tmp_path / name, options).out
        report = verify_folder(folder, str(folder), "cpu")
        assert report.exit_code == 0, [c for c in report.checks if c.status != "pass"]
        names = [check.name for check in report.checks]
        assert names[:3] == ["manifest", "strict load", "config"]
        assert {"test-signals: features", "test-signals: encoder", "test-signals: logprobs",
                "test-signals: transcribe en->en greedy tokens", "test-signals: transcribe en->en beam4 tokens",
                "test-signals: translate en->de beam4 tokens"} <= set(names)


def test_the_cli_report_and_junit(converted: Path, tmp_path: Path) -> None:
    code, report, output = _verify(converted, tmp_path, "--junit-xml", str(tmp_path / "junit.xml"))
    assert code == 0 and report["passed"] and report["device"] == "cpu" and report["mlx"] == mx.__version__
    assert "test-signals: encoder" in output and "pass" in output
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    cases = suite.findall("testcase")
    assert suite.tag == "testsuite" and int(suite.get("tests")) == len(cases) == len(report["checks"])
    assert [case.get("name") for case in cases] == [check["name"] for check in report["checks"]]
    assert suite.get("failures") == suite.get("errors") == "0"
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["mlx"] == mx.__version__


def test_a_flipped_byte_in_the_weights(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x10
    (folder / WEIGHTS).write_bytes(bytes(data))
    code, report, output = _verify(folder, tmp_path, "--junit-xml", str(tmp_path / "junit.xml"))
    assert code == 3 and not report["passed"]
    manifest = report["checks"][0]
    assert manifest["status"] == "fail" and manifest["file"] == WEIGHTS
    assert "model.safetensors: sha256 differs from the manifest" in manifest["detail"]
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert int(suite.get("failures")) == len(_failed(report)) >= 1
    assert suite.find("testcase[@name='manifest']/failure") is not None


@pytest.mark.parametrize(("key", "edit", "stage"), [
    # One encoder matrix moved by 1e-3 everywhere: the encoder stage is the first to notice.
    ("encoder.layers.0.feed_forward1.linear1.weight", lambda w: w + 1e-3, "encoder"),
    # One decoder matrix moved by 1e-3: only the decoder's log-probs can notice.
    ("decoder.blocks.0.mlp1.weight", lambda w: w + 1e-3, "logprobs"),
])
def test_a_weight_changed_behind_the_manifest(converted: Path, tmp_path: Path, key: str, edit, stage: str) -> None:
    folder = copy_folder(converted, tmp_path)
    _edit_weights(folder, lambda weights: weights.update({key: edit(weights[key])}))
    code, report, _ = _verify(folder, tmp_path)
    statuses = _status(report)
    assert code == 3
    assert statuses["manifest"] == statuses["strict load"] == "pass"  # only the goldens can tell
    first = _failed(report)[0]
    assert first["name"] == f"test-signals: {stage}" and first["stage"] == stage
    if stage == "logprobs":
        assert statuses["test-signals: features"] == statuses["test-signals: encoder"] == "pass"


def test_a_changed_decoding_default(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["decoding"]["beam_size"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    rerecord(folder, "config.json")
    code, report, output = _verify(folder, tmp_path)
    assert code == 3
    failed = _failed(report)[0]
    assert failed["name"] == "config" and failed["file"] == "config.json"
    assert "decoding.beam_size is 4, was 1" in failed["detail"]


@pytest.mark.parametrize("damage", ["truncated weights", "missing tokenizer file"])
def test_a_damaged_folder_names_the_file(converted: Path, tmp_path: Path, damage: str) -> None:
    folder = copy_folder(converted, tmp_path)
    if damage == "truncated weights":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 3])
        named = WEIGHTS
    else:
        named = sorted(str(p.relative_to(folder)) for p in (folder / "tokenizer").rglob("*.model"))[0]
        (folder / named).unlink()
    code, report, _ = _verify(folder, tmp_path)
    statuses = _status(report)
    assert code == 3 and statuses["manifest"] == "fail" and statuses["strict load"] == "fail"
    assert report["checks"][0]["file"] == named
    assert statuses["goldens"] == "skipped"


def test_goldens_edited_by_hand(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    goldens = json.loads((folder / GOLDENS_FILE).read_text())
    goldens["groups"]["test-signals"]["decoding"][0]["tokens"][0][0] += 1
    (folder / GOLDENS_FILE).write_text(json.dumps(goldens))
    rerecord(folder, GOLDENS_FILE)
    code, report, _ = _verify(folder, tmp_path)
    goldens_check = next(check for check in report["checks"] if check["name"] == "goldens")
    assert code == 1 and goldens_check["status"] == "error" and goldens_check["file"] == GOLDENS_FILE
    assert "goldens.json: the content does not match its digest (edited by hand?)" in goldens_check["detail"]


@pytest.mark.parametrize(("version", "advice"), [(SCHEMA_VERSION + 1, "upgrade canary-convert"),
                                               (SCHEMA_VERSION - 1, "verify FOLDER --update")])
def test_goldens_of_another_schema_version(converted: Path, tmp_path: Path, version: int, advice: str) -> None:
    folder = copy_folder(converted, tmp_path)
    goldens = json.loads((folder / GOLDENS_FILE).read_text())
    goldens["version"] = version
    goldens["digest"] = goldens_digest(goldens)
    (folder / GOLDENS_FILE).write_text(json.dumps(goldens))
    rerecord(folder, GOLDENS_FILE)
    code, report, _ = _verify(folder, tmp_path)
    detail = next(check["detail"] for check in report["checks"] if check["name"] == "goldens")
    assert code == 1 and f"golden schema version {version}" in detail and advice in detail


def test_not_a_canary_convert_folder(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    result = run_cli("verify", str(tmp_path / "folder"))
    assert result.returncode == 1 and "not a canary-convert folder (conversion.json is missing)" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors(converted: Path) -> None:
    result = run_cli("verify", str(converted), "--device", "gpu")
    assert result.returncode == 2 and "has no gpu" in result.stderr
    result = run_cli("verify", str(converted), "--update", "--against", str(converted))
    assert result.returncode == 2 and "--update rewrites TARGET's own goldens" in result.stderr


def test_against_lists_exactly_the_tensors_that_differ(checkpoint: Path, converted: Path, tmp_path: Path) -> None:
    code, report, _ = _verify(converted, tmp_path, "--against", str(converted))
    assert code == 0 and report["checks"][0]["detail"].endswith("tensors identical")
    folder = copy_folder(converted, tmp_path)
    changed = ["decoder.blocks.1.mlp1.bias", "encoder.layers.1.norm_out.weight"]
    _edit_weights(folder, lambda weights: weights.update({key: weights[key] * 1.5 for key in changed}))
    code, report, _ = _verify(converted, tmp_path, "--against", str(folder))
    assert code == 3
    assert [check["name"] for check in _failed(report) if check["stage"] == "weights" and check["name"] != "tensors"] \
        == [f"tensor {key}" for key in sorted(changed)]
    # A quantized folder against its float twin: only the quantized layers differ, dequantized.
    quantized = convert(str(checkpoint), tmp_path / "q8", ConvertOptions(quantize=QuantizeOptions.create(8, 32))).out
    code, report, _ = _verify(converted, tmp_path, "--against", str(quantized))
    differing = {check["name"].removeprefix("tensor ") for check in _failed(report) if check["name"].startswith("tensor ")}
    q = json.loads((quantized / "config.json").read_text())["quantization"]
    stored = mx.load(str(quantized / WEIGHTS))
    assert differing == {key.replace(".scales", ".weight") for key in stored if key.endswith(".scales")}
    assert all(float(check["detail"].split()[2].rstrip(",")) < 0.05 for check in _failed(report)
               if check["name"].startswith("tensor "))  # max |Δ| of 8-bit rounding, not garbage
    assert q["bits"] == 8


def test_update_records_again_and_says_what_changed(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    key = "encoder.layers.0.feed_forward1.linear1.weight"
    _edit_weights(folder, lambda weights: weights.update({key: weights[key] + 1e-3}))
    result = run_cli("verify", str(folder), "--update")
    assert result.returncode == 0, result.stderr
    assert "test-signals: encoder moved by" in result.stdout and "goldens of" in result.stdout
    code, report, _ = _verify(folder, tmp_path)
    assert code == 0, _failed(report)


def test_verify_a_hub_repo_from_the_cache(converted: Path, tmp_path: Path, dead_endpoint: str) -> None:
    home = tmp_path / "hf-home"
    commit = commit_id("published")
    for path in sorted(p for p in converted.rglob("*") if p.is_file()):
        seed_cache(home, "mlx-community/tiny-canary", path.relative_to(converted).as_posix(), path.read_bytes(), commit)
    env = loopback_env(home, dead_endpoint, offline=True)
    code, report, _ = _verify(Path("mlx-community/tiny-canary"), tmp_path, env=env)
    assert code == 0 and report["target"] == "mlx-community/tiny-canary", report
    result = run_cli("verify", "mlx-community/absent", env=env)
    assert result.returncode == 1 and "mlx-community/absent: the Hugging Face Hub cannot be reached" in result.stderr


def test_goldens_are_deterministic(converted: Path, checkpoint: Path, tmp_path: Path) -> None:
    # Two conversions record the same goldens (the made_by block aside), so a committed file can be checked.
    again = convert(str(checkpoint), tmp_path / "again", ConvertOptions()).out
    first, second = (json.loads((folder / GOLDENS_FILE).read_text()) for folder in (converted, again))
    assert first["groups"] == second["groups"] and first["digest"] == second["digest"]
    values = np.array(first["groups"]["test-signals"]["stages"]["encoder"][0]["values"])
    assert values.size == 256 and np.unique(values).size > 200  # real numbers, not a constant


def test_golden_prompts_batched_give_what_each_gives_alone(converted: Path) -> None:
    """The goldens decode every prompt of a mode in one batch; each prompt's tokens, and near-tie gaps, are
    what decoding it alone gives."""
    model = load_model(converted)
    run = run_group(model, reference_signals(16000))
    prompts = golden_prompts(model)
    assert [prompt.task for prompt in prompts] == ["transcribe", "translate"]
    for options in golden_modes(model).values():
        together = decode_prompts(model, run, prompts, options)
        alone = [decode_prompts(model, run, [prompt], options)[0] for prompt in prompts]
        assert together == alone and all(len(tokens) == 3 for tokens in together)
        assert sum(len(ids) for tokens in together for ids in tokens) > 0
        spread_together = gaps(model, run, list(zip(prompts, together)))
        spread_alone = [gaps(model, run, [(prompt, tokens)])[0] for prompt, tokens in zip(prompts, alone)]
        for batched, single in zip(spread_together, spread_alone):
            for row_batched, row_single in zip(batched, single, strict=True):
                np.testing.assert_allclose(row_batched, row_single, atol=2e-5)


def test_the_maintainers_workflow_runs_commands_the_cli_accepts(converted: Path, tmp_path: Path,
                                                               dead_endpoint: str) -> None:
    """examples/ci/verify-mlx-canary.yml: valid YAML, and each matrix repo's verify command runs as written
    against that repo (here a converted folder in an offline Hub cache), writing both reports."""
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "verify-mlx-canary.yml").read_text())
    job = workflow["jobs"]["verify"]
    repos = job["strategy"]["matrix"]["repo"]
    commands = [step["run"] for step in job["steps"] if "canary-convert verify" in step.get("run", "")]
    assert len(commands) == 1 and repos and any(step.get("if") == "always()" and "upload-artifact" in step.get("uses", "")
                                                for step in job["steps"])
    home = tmp_path / "hf-home"
    for repo in repos:
        for path in sorted(p for p in converted.rglob("*") if p.is_file()):
            seed_cache(home, repo, path.relative_to(converted).as_posix(), path.read_bytes(), commit_id(repo))
    for repo in repos:
        words = shlex.split(commands[0].replace("${{ matrix.repo }}", repo))
        assert words[:2] == ["canary-convert", "verify"]
        workdir = tmp_path / repo.replace("/", "-")
        workdir.mkdir()
        result = subprocess.run([str(Path(sys.executable).parent / words[0]), *words[1:]], cwd=workdir,
                                env=loopback_env(home, dead_endpoint, offline=True), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        jsonschema.validate(json.loads((workdir / "verify-report.json").read_text()), SCHEMA)
        assert ElementTree.parse(workdir / "verify-report.xml").getroot().get("failures") == "0"
