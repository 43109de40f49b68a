"""Hostile checkpoints that ask for far more memory or time than their size: each is refused with one line,
in bounded memory and time, and a conversion of it leaves nothing behind.

Memory is measured in a child process (ru_maxrss after the imports, then after the read): the high-water
mark of everything the read made resident, an upper bound on its anonymous memory.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from canary_convert.archive import CONFIG_MEMBER, MAX_CONFIG_BYTES, MAX_CONFIG_NODES, MAX_MEMBERS, WEIGHTS_MEMBER
from canary_convert.checkpoint_zip import MAX_PICKLE_BYTES
from conftest import run_cli, run_measured

# What the read of one hostile archive may add to the child's peak resident memory.
READ_BOUND_BYTES = 64 << 20

_READ = """
import json, resource, sys, time
from pathlib import Path
from canary_convert.archive import open_archive
from canary_convert.errors import CanaryConvertError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.monotonic()
error = None
try:
    with open_archive(Path(sys.argv[1])) as archive:
        archive.config()
        with archive.state_dict() as state:
            for key in state:
                state[key].contiguous()  # what the rules do to every tensor
except CanaryConvertError as exc:
    error = [type(exc).__name__, str(exc)]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"error": error, "grown": grown, "seconds": time.monotonic() - started}))
"""


def _read_in_child(path: Path) -> dict:
    # run_measured's launcher gives the child a fresh high-water mark, not this test session's.
    result, _, _ = run_measured([sys.executable, "-c", _READ, str(path)])
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name.removeprefix("./"): tar.extractfile(info).read() for info in tar if info.isfile()}


def _write_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _write_folder(path: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _pickle_bomb(ckpt: bytes, zeros_mib: int) -> tuple[bytes, int]:
    """The checkpoint with its data.pkl deflated and followed by `zeros_mib` MiB of zeros after the pickle's
    STOP (which the unpickler never reads): a valid checkpoint whose pickle record inflates that far.
    Returns the checkpoint and the record's inflated size."""
    source = zipfile.ZipFile(io.BytesIO(ckpt))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if not info.filename.endswith("/data.pkl"):
                target.writestr(info, data)
                continue
            record_info = zipfile.ZipInfo(info.filename)
            record_info.compress_type = zipfile.ZIP_DEFLATED
            with target.open(record_info, "w", force_zip64=True) as record:
                record.write(data)
                zeros = bytes(1 << 20)
                for _ in range(zeros_mib):
                    record.write(zeros)
                inflated = len(data) + zeros_mib * len(zeros)
    return buffer.getvalue(), inflated


@pytest.fixture(scope="module")
def pickle_bomb(checkpoint: Path) -> tuple[dict[str, bytes], int]:
    members = _members(checkpoint)
    members[WEIGHTS_MEMBER], inflated = _pickle_bomb(members[WEIGHTS_MEMBER], 256)
    assert len(members[WEIGHTS_MEMBER]) < 1 << 20  # a quarter GiB of pickle from under 1 MB
    return members, inflated


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "folder"])
def test_pickle_bomb_is_refused_before_it_inflates(pickle_bomb: tuple[dict[str, bytes], int], tmp_path: Path,
                                                   kind: str) -> None:
    members, inflated = pickle_bomb
    if kind == "folder":
        (tmp_path / "m").mkdir()
        source = _write_folder(tmp_path / "m", members)
    else:
        source = _write_tar(tmp_path / f"m.{kind}", members, "w:gz" if kind == "tar.gz" else "w")
    read = _read_in_child(source)
    assert read["error"][0] == "ArchiveError"
    assert f"data.pkl declares {inflated} bytes, more than the {MAX_PICKLE_BYTES >> 20} MiB" in read["error"][1]
    assert read["grown"] < READ_BOUND_BYTES, read
    assert read["seconds"] < 30, read


def _state(members: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(members[WEIGHTS_MEMBER]), weights_only=True)


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_stride_bomb_is_refused_before_it_expands(checkpoint: Path, tmp_path: Path) -> None:
    # One float stored, 2**26 rows of 4 seen through stride 0: a GiB once copied.
    members = _members(checkpoint)
    state = _state(members)
    state["encoder.bomb"] = torch.ones(1).expand(1 << 26, 4)
    members[WEIGHTS_MEMBER] = _saved(state)
    read = _read_in_child(_write_tar(tmp_path / "m.nemo", members))
    assert read["error"] == ["ArchiveError", f"{tmp_path / 'm.nemo'}:model_weights.ckpt: tensor encoder.bomb has "
                             f"shape (67108864, 4) and stride (0, 0): 1073741824 bytes of elements over a storage "
                             f"of 4; a tensor may not hold more elements than its storage"]
    assert read["grown"] < READ_BOUND_BYTES, read
    assert read["seconds"] < 30, read


def test_stride_bomb_conversion_exits_1_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    # The bomb in place of a real weight, with its real shape: the shapes alone would pass the plan.
    members = _members(checkpoint)
    state = _state(members)
    key = "transf_decoder._embedding.token_embedding.weight"
    state[key] = torch.ones(1).expand(state[key].shape)
    members[WEIGHTS_MEMBER] = _saved(state)
    source = _write_tar(tmp_path / "m.nemo", members)
    result = run_cli(str(source), str(tmp_path / "mlx"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"error: {source}:model_weights.ckpt: tensor {key} has shape" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.nemo"]


def _alias_bomb(levels: int) -> bytes:
    """Ten aliases per level: `levels` lines that expand to 10**levels nodes."""
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


def test_yaml_alias_bomb_is_refused_in_bounded_time(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    members[CONFIG_MEMBER] = members[CONFIG_MEMBER] + _alias_bomb(9)  # a billion nodes from 700 bytes
    source = _write_tar(tmp_path / "m.nemo", members)
    read = _read_in_child(source)
    assert read["error"] == ["ArchiveError", f"{source}: model_config.yaml: its aliases expand to more than "
                             f"{MAX_CONFIG_NODES} nodes; refusing a YAML alias bomb"]
    assert read["grown"] < READ_BOUND_BYTES, read
    assert read["seconds"] < 10, read
    started = time.monotonic()
    result = run_cli(str(source), str(tmp_path / "mlx"))
    assert result.returncode == 1 and "refusing a YAML alias bomb" in result.stderr, result.stderr
    assert time.monotonic() - started < 60
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.nemo"]


def test_aliases_that_expand_within_the_bound_still_load(checkpoint: Path, tmp_path: Path) -> None:
    # YAML anchors are legitimate: a config may share a section by alias, as long as it stays small.
    members = _members(checkpoint)
    members[CONFIG_MEMBER] = members[CONFIG_MEMBER] + _alias_bomb(3)
    from canary_convert.archive import open_archive

    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        config = archive.config()
    assert config["lol2"] == [[["lol"] * 10] * 10] * 10


@pytest.mark.parametrize(("text", "message"), [
    (b"a: &a [*a]\n", "an alias refers to a node that holds it; refusing a recursive config"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "is not safe, plain YAML: while increasing flow level"),
    (b"a: ${b}\nb: ${a}\n", "model_config.yaml: cannot resolve"),
])
def test_recursive_and_deep_configs_are_one_line_errors(checkpoint: Path, tmp_path: Path, text: bytes,
                                                        message: str) -> None:
    from canary_convert.archive import open_archive
    from canary_convert.errors import ArchiveError

    members = _members(checkpoint)
    members[CONFIG_MEMBER] = text
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(ArchiveError, match=message) as raised:
            archive.config()
    assert "\n" not in str(raised.value)


def test_config_larger_than_the_bound_is_refused_unread(checkpoint: Path, tmp_path: Path) -> None:
    from canary_convert.archive import open_archive
    from canary_convert.errors import ArchiveError

    members = _members(checkpoint)
    members[CONFIG_MEMBER] = members[CONFIG_MEMBER] + b"# padding\n" * (MAX_CONFIG_BYTES // 10)
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        size = archive.members[CONFIG_MEMBER]
        with pytest.raises(ArchiveError, match=f"model_config.yaml holds {size} bytes, more than the 1 MiB"):
            archive.config()


def test_archive_of_too_many_members_is_refused_while_listing(checkpoint: Path, tmp_path: Path) -> None:
    # Each member is a 512-byte header that costs a TarInfo to list: a million of them is half a GB of tar.
    members = _members(checkpoint)
    members.update({f"pad/{index}": b"" for index in range(MAX_MEMBERS + 1)})
    source = _write_tar(tmp_path / "m.nemo", members)
    read = _read_in_child(source)
    assert read["error"] == ["ArchiveError", f"{source}: more than {MAX_MEMBERS} members; refusing to list them all"]
    assert read["grown"] < READ_BOUND_BYTES, read
