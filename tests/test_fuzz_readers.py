"""Property-based: the readers of a folder's JSON files (goldens, manifest, index, config.json) raise only the
project's errors, in bounded time, on any input: random JSON, random bytes, and the committed example's own
files with one value replaced or one key removed (the inputs that get furthest into the checks).
The archive, pickle and rule readers have theirs in test_fuzz.py."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from canary_convert.errors import CanaryConvertError, ModelFolderError
from canary_convert.goldens import GoldensError, goldens_digest, read_goldens
from canary_convert.manifest import manifest_problems, read_record, recorded_manifest
from canary_convert.model.load import INDEX_FILE, read_config, weight_files
from conftest import REPO
from test_fuzz import FUZZ  # the readers' settings: 60 examples, FUZZ_EXAMPLES=2000 for a deeper search

EXAMPLE = REPO / "examples" / "tiny-canary"
GOLDENS = json.loads((EXAMPLE / "goldens.json").read_text())
CONFIG = GOLDENS["config"]  # the example's config.json, as recorded with its goldens
# Each example's own reading time is milliseconds; a hostile one may not take more than this.
SECONDS_PER_EXAMPLE = 2.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=40,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):  # the first rows stand for the rest
            found += _paths(child, (*prefix, index))
    return found


GOLDEN_PATHS = [path for path in _paths(GOLDENS) if path and path[0] != "digest"]
CONFIG_PATHS = [path for path in _paths(CONFIG) if path]


@st.composite
def mutated(draw: st.DrawFn, document: Any, paths: list[tuple]) -> Any:
    """`document` with one value replaced by random JSON, or its key removed."""
    copied = copy.deepcopy(document)
    path = draw(st.sampled_from(paths))
    parent = copied
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return copied


def _fresh_folder(tmp_path: Path, present: str) -> Path:
    """An empty folder (each hypothesis example starts afresh) holding one file, `present`."""
    folder = tmp_path / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / present).write_text("{}")
    return folder


def _only_ours(read, error: type[CanaryConvertError]) -> None:
    started = time.monotonic()
    try:
        read()
    except error:
        pass
    assert time.monotonic() - started < SECONDS_PER_EXAMPLE


@FUZZ
@given(document=mutated(GOLDENS, GOLDEN_PATHS))
def test_goldens_one_value_changed(tmp_path: Path, document: Any) -> None:
    document["digest"] = goldens_digest(document)  # as an attacker would: only the shape checks remain
    path = tmp_path / "goldens.json"
    path.write_text(json.dumps(document))
    _only_ours(lambda: read_goldens(path), GoldensError)


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode()))
def test_goldens_anything(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "goldens.json"
    path.write_bytes(data)
    _only_ours(lambda: read_goldens(path), GoldensError)


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda value: json.dumps({"manifest": value}).encode()))
def test_conversion_record_and_manifest(tmp_path: Path, data: bytes) -> None:
    folder = _fresh_folder(tmp_path, "config.json")
    (folder / "conversion.json").write_bytes(data)

    def read() -> None:
        manifest_problems(folder, recorded_manifest(folder, read_record(folder)))

    _only_ours(read, ModelFolderError)


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda value: json.dumps({"weight_map": value}).encode()))
def test_index(tmp_path: Path, data: bytes) -> None:
    folder = _fresh_folder(tmp_path, "model.safetensors")
    (folder / INDEX_FILE).write_bytes(data)
    started = time.monotonic()
    try:
        files = weight_files(folder)
    except ModelFolderError:
        files = []
    assert time.monotonic() - started < SECONDS_PER_EXAMPLE
    # Whatever the index says, nothing outside the folder is ever handed on.
    assert all(file.resolve().is_relative_to(folder.resolve()) for file in files)


@FUZZ
@given(document=mutated(CONFIG, CONFIG_PATHS) | json_values)
def test_config_json(tmp_path: Path, document: Any) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    _only_ours(lambda: read_config(path), ModelFolderError)  # any family's, by model_type
