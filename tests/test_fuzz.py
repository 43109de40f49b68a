"""Property-based fuzzing of what reads untrusted bytes: the `.nemo` reader (tar, tar.gz, folder), the
torch.save zip and its pickle, and the mapping rules with the planner. Whatever the input, only the
project's errors (CanaryConvertError) come out, each example in bounded time (hypothesis' deadline)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary_convert.archive import CONFIG_MEMBER, WEIGHTS_MEMBER, open_archive
from canary_convert.checkpoint_zip import map_checkpoint
from canary_convert.errors import CanaryConvertError
from canary_convert.rules import parse_rules, plan_conversion

# 60 examples a test keeps the suite fast; FUZZ_EXAMPLES=2000 searches deeper (and FUZZ_SEED=N elsewhere).
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=2000,
                derandomize="FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                "encoder.bias": torch.ones(3, dtype=torch.float16),
                "decoder.view": torch.arange(8, dtype=torch.int64)[2:6]}, buffer)
    return buffer.getvalue()


CKPT = _checkpoint_bytes()
CONFIG = yaml.safe_dump({"target": "nemo.collections.asr.models.EncDecMultiTaskModel", "sample_rate": 16000,
                         "encoder": {"d_model": 4, "n_layers": "${encoder.d_model}"},
                         "tokenizer": {"model_path": "nemo:tokenizer.model"}}).encode()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


NEMO = _tar({CONFIG_MEMBER: CONFIG, WEIGHTS_MEMBER: CKPT, "tokenizer.model": b"spm"})


def _mutated(original: bytes) -> st.SearchStrategy[bytes]:
    """The bytes with a few spans overwritten, then possibly cut short."""
    edit = st.tuples(st.integers(0, len(original) - 1), st.binary(min_size=1, max_size=16))

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(original)
        for position, patch in draw(st.lists(edit, min_size=1, max_size=6)):
            data[position : position + len(patch)] = patch
        cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
        return bytes(data[:cut] if cut is not None else data)

    return build()


def _read_everything(path: Path) -> None:
    """What a conversion reads of an archive: config, artifacts, every tensor copied."""
    with open_archive(path) as archive:
        config = archive.config()
        archive.artifacts(config)
        with archive.state_dict() as state:
            for key in state:
                state[key].contiguous()
                state[key].to(torch.float32)


def _only_our_errors(read: Any, *args: Any) -> None:
    try:
        read(*args)
    except CanaryConvertError as exc:
        assert "\n" not in str(exc), str(exc)


@FUZZ
@given(data=_mutated(NEMO))
def test_fuzzed_plain_tar(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.nemo"
    path.write_bytes(data)
    _only_our_errors(_read_everything, path)


@FUZZ
@given(data=_mutated(_tar({CONFIG_MEMBER: CONFIG, WEIGHTS_MEMBER: CKPT, "tokenizer.model": b"spm"}, "w:gz")))
def test_fuzzed_tar_gz(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.nemo"
    path.write_bytes(data)
    _only_our_errors(_read_everything, path)


@FUZZ
@given(data=_mutated(CKPT))
def test_fuzzed_checkpoint_zip(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / WEIGHTS_MEMBER
    path.write_bytes(data)

    def read() -> None:
        for tensor in map_checkpoint(path, 0, len(data), "fuzz").values():
            tensor.contiguous()

    _only_our_errors(read)


def _with_pickle(data_pkl: bytes) -> bytes:
    """CKPT with its data.pkl record replaced (a valid zip around any pickle bytes)."""
    source = zipfile.ZipFile(io.BytesIO(CKPT))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            target.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    return buffer.getvalue()


_PICKLE = zipfile.ZipFile(io.BytesIO(CKPT)).read(next(n for n in zipfile.ZipFile(io.BytesIO(CKPT)).namelist()
                                                      if n.endswith("/data.pkl")))
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
                    st.builds(lambda n: torch.zeros(n), st.integers(0, 4)))
_VALUES = st.recursive(_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=4),
                                                        st.tuples(inner, inner)), max_leaves=12)


@FUZZ
@given(data=st.one_of(_mutated(_PICKLE), st.binary(max_size=256)))
def test_fuzzed_pickle_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / WEIGHTS_MEMBER
    path.write_bytes(_with_pickle(data))
    _only_our_errors(lambda: [t.contiguous() for t in map_checkpoint(path, 0, path.stat().st_size, "fuzz").values()])


@FUZZ
@given(value=_VALUES)
def test_fuzzed_pickled_objects(tmp_path: Path, value: Any) -> None:
    # Anything torch.save writes: a state dict of named tensors loads, everything else is refused by name.
    path = tmp_path / WEIGHTS_MEMBER
    torch.save(value, path)
    _only_our_errors(lambda: map_checkpoint(path, 0, path.stat().st_size, "fuzz"))


_NAMES = st.sampled_from(["encoder.{n}.weight", "decoder.w", "^encoder\\.(?P<n>\\d+)\\.bias$", "x.{a}.{a}", "(", "",
                          "{n}", "^(a|b)+$"])
_FIELD_VALUES = st.one_of(_NAMES, st.integers(-3, 3), st.booleans(), st.none(), st.lists(st.integers(-1, 3), max_size=4),
                          st.sampled_from(["conv1d", "conv2d", "float16", "bfloat16", "int8", "side.safetensors"]),
                          st.dictionaries(st.sampled_from(["squeeze", "transpose", "a", "b", "scale"]),
                                          st.one_of(st.integers(-2, 3), st.lists(st.integers(0, 3), max_size=3),
                                                    _NAMES), max_size=3))
_ANY_FIELD = st.one_of(_FIELD_VALUES, st.lists(_FIELD_VALUES, max_size=3))
# Mostly rules that pass the first checks (one pattern, one action), so the fuzz reaches the later ones.
_RULE = st.one_of(
    st.builds(lambda kind, pattern, action, value, extra: {kind: pattern, action: value, **extra},
              st.sampled_from(["match", "regex"]), _ANY_FIELD, st.sampled_from(["to", "drop", "folded"]), _ANY_FIELD,
              st.dictionaries(st.sampled_from(["transforms", "dtype", "same_as", "optional", "file", "lora"]),
                              _ANY_FIELD, max_size=3)),
    st.fixed_dictionaries({"include": _ANY_FIELD}, optional={"prefix": _ANY_FIELD}),
    st.dictionaries(st.sampled_from(["match", "regex", "to", "drop", "folded", "transforms", "dtype", "same_as",
                                     "optional", "file", "lora", "include", "prefix", "bogus"]), _ANY_FIELD, max_size=5),
    _FIELD_VALUES,
)
_DOCUMENT = st.one_of(
    st.fixed_dictionaries({"name": _FIELD_VALUES, "rules": st.lists(_RULE, max_size=5)},
                          optional={"quantize": st.one_of(st.lists(_NAMES, max_size=2), _FIELD_VALUES),
                                    "extra": _FIELD_VALUES}),
    st.recursive(_FIELD_VALUES, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
)
_SOURCE = {"encoder.0.weight": torch.zeros(2, 3, 4), "encoder.0.bias": torch.zeros(2), "decoder.w": torch.zeros(3, 1)}


@FUZZ
@given(document=_DOCUMENT, expected=st.dictionaries(_NAMES, st.lists(st.integers(0, 4), max_size=3).map(tuple),
                                                    max_size=3))
def test_fuzzed_rules_and_plan(document: Any, expected: dict[str, tuple[int, ...]]) -> None:
    def parse_and_plan() -> None:
        rules = parse_rules(yaml.safe_dump(document).encode(), "fuzz.yaml")
        plan_conversion(rules, _SOURCE, expected)

    _only_our_errors(parse_and_plan)


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzzed_rules_text(text: str) -> None:
    _only_our_errors(lambda: parse_rules(text.encode(), "fuzz.yaml"))


@pytest.mark.parametrize("data", [NEMO, _tar({CONFIG_MEMBER: CONFIG, WEIGHTS_MEMBER: CKPT, "tokenizer.model": b"s"},
                                             "w:gz")])
def test_unmutated_inputs_read_cleanly(tmp_path: Path, data: bytes) -> None:
    # The fuzzers start from archives the reader accepts: their errors come from the mutations.
    path = tmp_path / "m.nemo"
    path.write_bytes(data)
    _read_everything(path)
