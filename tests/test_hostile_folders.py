"""A converted folder is untrusted input: `verify` must never pass on a file its manifest does not cover, the
folder cannot switch verify off, and every malformed file is one line naming it (issue 16, items 2-4).

Each hostile folder is built the way an attacker would, re-recording the manifest and the goldens' digest
so that only the new checks can catch it. Every CLI run is bounded: `WALL_SECONDS` and `PEAK_MIB`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import ModelFolderError
from canary_convert.goldens import GOLDENS_FILE, GoldensError, read_goldens, goldens_digest, stage_distance
from canary_convert.untrusted import MAX_JSON_BYTES, folder_dir, folder_file, read_json
from conftest import copy_folder, rerecord, run_cli_measured

# A verify of the tiny model takes ~5 s and ~450 MiB here (MLX, NeMo-free); a hostile file may add little.
WALL_SECONDS = 60
PEAK_MIB = 1024
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(str(checkpoint), tmp_path_factory.mktemp("hostile") / "mlx", ConvertOptions()).out


def _edit_goldens(folder: Path, edit) -> None:
    """Edit goldens.json, recompute its digest and re-record it: only the shape checks stand in the way."""
    goldens = json.loads((folder / GOLDENS_FILE).read_text())
    edit(goldens)
    goldens["digest"] = goldens_digest(goldens)
    (folder / GOLDENS_FILE).write_text(json.dumps(goldens))  # json.dumps writes NaN and Infinity as is
    rerecord(folder, GOLDENS_FILE)


def _verify(folder: Path, tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    """The CLI's exit code, JSON report and stderr, within the time and memory bounds, never a traceback."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    result, seconds, peak = run_cli_measured("verify", str(folder), "--json", str(report), *args,
                                             timeout=WALL_SECONDS * 2)
    assert "Traceback" not in result.stderr, result.stderr
    assert seconds < WALL_SECONDS and peak < PEAK_MIB, (seconds, peak)
    data = json.loads(report.read_text()) if report.exists() else {}
    return result.returncode, data, result.stderr


def _check(report: dict, name: str) -> dict:
    return next(check for check in report["checks"] if check["name"] == name)


def _scale_weights(folder: Path, factor: float = 1.5) -> None:
    """The attacker's model: every encoder weight of the first layer scaled by `factor`."""
    weights = dict(mx.load(str(folder / WEIGHTS)))
    for key in [key for key in weights if key.startswith("encoder.layers.0.") and key.endswith(".weight")]:
        weights[key] = weights[key] * factor
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "mlx"})
    rerecord(folder, WEIGHTS)


# --- item 2: nothing outside the folder, nothing outside the manifest -----------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{absolute}", "sub/../../outside.safetensors",
                                   "linked.safetensors"])
def test_shard_names_never_leave_the_folder(converted: Path, tmp_path: Path, shard: str) -> None:
    folder = copy_folder(converted, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / WEIGHTS, outside)
    if shard == "linked.safetensors":  # a link inside the folder, recorded in the manifest with its content
        (folder / shard).symlink_to(outside)
    shard = shard.format(absolute=outside)
    keys = mx.load(str(outside)).keys()
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {key: shard for key in keys}}))
    rerecord(folder, INDEX, *(["linked.safetensors"] if shard == "linked.safetensors" else []), drop=(WEIGHTS,))
    code, report, _ = _verify(folder, tmp_path)
    load = _check(report, "strict load")
    assert code == 3 and not report["passed"] and load["status"] == "fail"
    assert f"{INDEX} names {shard!r}" in load["detail"]
    assert ("leads outside the folder" if shard == "linked.safetensors" else "not a plain file name") in load["detail"]
    with pytest.raises(ModelFolderError, match="not a loadable canary-convert MLX folder"):
        load_model(folder)  # canary-transcribe's path


def test_tokenizer_paths_never_leave_the_folder(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    language, name = next(iter(config["tokenizer"]["langs"].items()))
    shutil.copy(folder / name, tmp_path / "outside.model")
    config["tokenizer"]["langs"][language] = "../outside.model"
    (folder / "config.json").write_text(json.dumps(config))
    rerecord(folder, "config.json")
    code, report, _ = _verify(folder, tmp_path)
    load = _check(report, "strict load")
    assert code == 3 and load["status"] == "fail" and load["file"] == "config.json"
    assert "config.json tokenizer names '../outside.model': not a plain file name" in load["detail"]


def test_a_file_the_model_reads_must_be_in_the_manifest(converted: Path, tmp_path: Path) -> None:
    # .cache/ is huggingface_hub's own folder, left out of the manifest: the model must not read from it.
    folder = copy_folder(converted, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    language, name = next(iter(config["tokenizer"]["langs"].items()))
    (folder / ".cache").mkdir()
    shutil.move(folder / name, folder / ".cache" / "swapped.model")
    config["tokenizer"]["langs"][language] = ".cache/swapped.model"
    (folder / "config.json").write_text(json.dumps(config))
    rerecord(folder, "config.json", drop=(name,))
    code, report, _ = _verify(folder, tmp_path)
    manifest = report["checks"][0]
    assert code == 3 and manifest["status"] == "fail"
    assert ".cache/swapped.model: read by the model but not in the manifest" in manifest["detail"]


@pytest.mark.parametrize("entry", ["link to /dev/zero", "fifo", "link to a folder outside"])
def test_anything_but_a_listed_regular_file_fails(converted: Path, tmp_path: Path, entry: str) -> None:
    folder = copy_folder(converted, tmp_path)
    if entry == "link to /dev/zero":
        (folder / "extra.bin").symlink_to("/dev/zero")
    elif entry == "fifo":
        os.mkfifo(folder / "extra.bin")  # hashing it would wait forever
    else:
        (tmp_path / "elsewhere").mkdir()
        (folder / "extra.bin").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    code, report, _ = _verify(folder, tmp_path)
    manifest = report["checks"][0]
    assert code == 3 and manifest["status"] == "fail" and manifest["file"] == "extra.bin"
    assert "extra.bin: not in the manifest" in manifest["detail"]


def test_a_listed_file_replaced_by_a_device_fails(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    (folder / GOLDENS_FILE).unlink()
    os.mkfifo(folder / GOLDENS_FILE)
    code, report, _ = _verify(folder, tmp_path)
    assert code != 0 and report["checks"][0]["status"] == "fail"
    assert f"{GOLDENS_FILE}: not a regular file" in report["checks"][0]["detail"]
    assert _check(report, "goldens")["status"] == "error"


def test_the_hub_cache_links_stay_readable(tmp_path: Path) -> None:
    # huggingface_hub's layout: snapshots/<commit>/NAME -> ../../blobs/<hash>; another repo's blobs are outside.
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    assert folder_file(snapshot, "config.json") == snapshot / "config.json"
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "def").write_text("{}")
    (snapshot / "stolen.json").symlink_to(other / "def")
    with pytest.raises(ModelFolderError, match="stolen.json: leads outside the folder"):
        folder_file(snapshot, "stolen.json")


def test_a_named_sub_folder_stays_inside(tmp_path: Path) -> None:
    # A speech-LLM folder names the folder mlx_lm.load() reads (config.json llm_folder).
    folder = tmp_path / "folder"
    (folder / "llm").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert folder_dir(folder, "llm") == folder / "llm"
    for name, says in (("../elsewhere", "not a plain file name"), ("/tmp", "not a plain file name"),
                       ("linked", "leads outside the folder"), ("absent", "not a folder")):
        with pytest.raises(ModelFolderError, match=f"config.json llm_folder names '{re.escape(name)}': {says}"):
            folder_dir(folder, name, "config.json llm_folder")


# --- item 3: the folder cannot switch verify off ----------------------------------------------------------------


def _nan_stages(goldens: dict) -> None:
    for rows in goldens["groups"]["test-signals"]["stages"].values():
        for row in rows:
            row["values"] = [math.nan] * len(row["values"])
            row["l2"] = math.nan


def _tolerances(value: float):
    def edit(goldens: dict) -> None:
        goldens["tolerances"] = {name: value for name in goldens["tolerances"]}
    return edit


def _nan_gaps(goldens: dict) -> None:  # a NaN gap would make every token difference an advisory near-tie
    for decoded in goldens["groups"]["test-signals"]["decoding"]:
        decoded["gaps"] = [[math.nan] * len(row) for row in decoded["gaps"]]


@pytest.mark.parametrize(("edit", "code", "says"), [
    (_nan_stages, 1, "NaN is not a number JSON allows"),
    (_tolerances(math.inf), 1, "Infinity is not a number JSON allows"),
    (_tolerances(math.nan), 1, "NaN is not a number JSON allows"),
    (_nan_gaps, 1, "NaN is not a number JSON allows"),
    (_tolerances(1e300), 3, "test-signals: encoder"),  # recorded tolerances only tighten: the tool's hold
    (_tolerances(-1.0), 1, "tolerances.features_max_abs: -1.0 is below 0"),
], ids=["nan-stages", "inf-tolerances", "nan-tolerances", "nan-gaps", "huge-tolerances", "negative-tolerances"])
def test_scaled_weights_never_pass_whatever_the_goldens_say(converted: Path, tmp_path: Path, edit, code: int,
                                                            says: str) -> None:
    folder = copy_folder(converted, tmp_path)
    _scale_weights(folder)
    _edit_goldens(folder, edit)
    exit_code, report, stderr = _verify(folder, tmp_path)
    assert exit_code == code and not report["passed"]
    if code == 1:
        goldens = _check(report, "goldens")
        assert goldens["status"] == "error" and says in goldens["detail"] and goldens["file"] == GOLDENS_FILE
    else:
        assert _check(report, says)["status"] == "fail"


def test_recorded_tolerances_may_tighten(converted: Path, tmp_path: Path) -> None:
    folder = copy_folder(converted, tmp_path)
    _scale_weights(folder)  # fails on the tool's tolerances ...
    loose = ("--tol-encoder", "1e9", "--tol-logprobs", "1e9", "--near-tie", "1e9")
    code, report, _ = _verify(folder, tmp_path, *loose)
    assert code == 0, [c for c in report["checks"] if c["status"] != "pass"]  # ... the command line has the last word
    _edit_goldens(folder, _tolerances(0.0))
    code, report, _ = _verify(folder, tmp_path, "--tol-features", "1", *loose)
    assert code == 0  # ... even over recorded ones ...
    nudged = copy_folder(converted, tmp_path / "nudged")
    _scale_weights(nudged, 1 + 1e-6)  # within the tool's float32 encoder tolerance (1e-5) ...
    code, report, _ = _verify(nudged, tmp_path)
    assert code == 0, [c for c in report["checks"] if c["status"] != "pass"]
    _edit_goldens(nudged, lambda goldens: goldens["tolerances"].update(encoder_rel_l2=1e-9))
    code, report, _ = _verify(nudged, tmp_path)  # ... but not the tighter one the folder records
    assert code == 3 and _check(report, "test-signals: encoder")["detail"].endswith("(limit 1e-09)")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_tolerance_on_the_command_line_is_a_finite_number(converted: Path, tmp_path: Path, value: str) -> None:
    result, seconds, _ = run_cli_measured("verify", str(converted), "--tol-encoder", value)
    assert result.returncode == 2 and "a tolerance is a finite number >= 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_nan_in_the_current_run_is_an_infinite_distance() -> None:
    golden = [{"size": 2, "l2": 1.0, "values": [0.5, 0.5]}]
    now = [{"size": 2, "l2": math.nan, "values": [math.nan, 0.5]}]
    assert stage_distance("features", golden, now) == math.inf
    assert stage_distance("encoder", golden, now) == math.inf
    assert stage_distance("features", golden, golden * 2) == math.inf  # another number of utterances


# --- item 4: malformed files are one line naming the file and the key ---------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _position_out_of_range(goldens: dict) -> None:
    goldens["groups"]["test-signals"]["stages"]["encoder"][0]["positions"][0] = 10**9


def _huge_beam(goldens: dict) -> None:
    goldens["groups"]["test-signals"]["decoding"][1]["beam_size"] = 10**6


def _no_tolerances(goldens: dict) -> None:
    del goldens["tolerances"]


def _long_prompt(goldens: dict) -> None:
    goldens["groups"]["test-signals"]["decoding"][0]["prompt"]["decoder_context"] = "x" * 100_000


def _fewer_utterances(goldens: dict) -> None:
    goldens["groups"]["test-signals"]["decoding"][0]["tokens"].pop()


def _unsampled_logprobs(goldens: dict) -> None:  # no positions: the stage would compare nothing
    for row in goldens["groups"]["test-signals"]["stages"]["logprobs"]:
        row["positions"], row["values"] = [], []


def _repeated_position(goldens: dict) -> None:  # one value sampled 256 times
    row = goldens["groups"]["test-signals"]["stages"]["logprobs"][0]
    row["positions"] = [row["positions"][0]] * len(row["positions"])
    row["values"] = [row["values"][0]] * len(row["values"])


def _no_decoding(goldens: dict) -> None:
    goldens["groups"]["test-signals"]["decoding"] = []


@pytest.mark.parametrize(("damage", "code", "file", "says"), [
    (lambda f: (f / GOLDENS_FILE).write_text(_nested(100_000)), 1, GOLDENS_FILE, "nested more than 32 levels"),
    (lambda f: (f / GOLDENS_FILE).write_text(_nested(40)), 1, GOLDENS_FILE, "nested more than 32 levels"),
    (lambda f: (f / "conversion.json").write_text(_nested(100_000)), 1, "conversion.json", "nested more than 32"),
    (lambda f: (f / "conversion.json").write_bytes(b" " * (MAX_JSON_BYTES + 1)), 1, "conversion.json",
     f"more than the {MAX_JSON_BYTES}"),
    (lambda f: ((f / "conversion.json").unlink(), (f / "conversion.json").symlink_to("/dev/zero")), 1,
     "conversion.json", "leads outside the folder"),
    (lambda f: _edit_goldens(f, _position_out_of_range), 1, GOLDENS_FILE,
     "groups.test-signals.stages.encoder[0].positions[0]: 1000000000 is not an integer in [0, "),
    (lambda f: _edit_goldens(f, _huge_beam), 1, GOLDENS_FILE,
     "groups.test-signals.decoding[1].mode: ('beam4', 'beam', 1000000) is not one of the recorded modes"),
    (lambda f: _edit_goldens(f, _no_tolerances), 1, GOLDENS_FILE, "goldens.json: no 'tolerances'"),
    (lambda f: _edit_goldens(f, _fewer_utterances), 1, GOLDENS_FILE, "decoding[0].gaps: "),
    (lambda f: _edit_goldens(f, _long_prompt), 1, GOLDENS_FILE, "is not one canary-convert records for this model"),
    (lambda f: _edit_goldens(f, _unsampled_logprobs), 1, GOLDENS_FILE,
     "stages.logprobs[0].positions: 0 positions, canary-convert samples 256"),
    (lambda f: _edit_goldens(f, _repeated_position), 1, GOLDENS_FILE, "stages.logprobs[0].positions: a position repeats"),
    (lambda f: _edit_goldens(f, _no_decoding), 1, GOLDENS_FILE, "groups.test-signals.decoding: no decoding recorded"),
    (lambda f: ((f / INDEX).write_text("{not json"), rerecord(f, INDEX)), 3, INDEX, "not valid JSON"),
    (lambda f: ((f / INDEX).write_text(_nested(100_000)), rerecord(f, INDEX)), 3, INDEX, "nested more than 32"),
    (lambda f: ((f / INDEX).write_text('{"weight_map": [1]}'), rerecord(f, INDEX)), 3, INDEX,
     "`weight_map` is not an object"),
    (lambda f: ((f / "config.json").write_text(_nested(100_000)), rerecord(f, "config.json")), 3, "config.json",
     "nested more than 32"),
], ids=["goldens-deep", "goldens-40-deep", "conversion-deep", "conversion-huge", "conversion-dev-zero",
        "position-out-of-range", "beam-1e6", "missing-key", "fewer-rows", "unrecorded-prompt", "unsampled-stage",
        "repeated-position", "no-decoding", "index-not-json", "index-deep",
        "index-wrong-shape", "config-deep"])
def test_malformed_files_are_one_line_naming_file_and_key(converted: Path, tmp_path: Path, damage, code: int,
                                                         file: str, says: str) -> None:
    folder = copy_folder(converted, tmp_path)
    damage(folder)
    exit_code, report, stderr = _verify(folder, tmp_path)
    assert exit_code == code
    if not report:  # no report at all: the folder is not one (conversion.json): the CLI's one line
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and file in lines[0] and says in lines[0], stderr
        return
    failing = [check for check in report["checks"] if check["status"] in ("fail", "error")]
    assert any(says in check["detail"] and file in check["detail"] for check in failing), failing
    assert all("\n" not in check["detail"] for check in report["checks"])


def test_read_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "goldens.json"
    path.write_text('{"a": NaN}')
    with pytest.raises(GoldensError, match=r"goldens.json: not valid JSON \(NaN is not a number JSON allows"):
        read_json(path, GoldensError)
    path.write_text("\xff\xfe", encoding="latin-1")
    with pytest.raises(GoldensError, match="goldens.json: not valid JSON"):
        read_goldens(path)
