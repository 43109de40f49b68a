"""The manifest in conversion.json: every file of OUT with its size and sha256, and what changed since."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from canary_convert.convert import ConvertOptions, convert
from canary_convert.manifest import FileRecord, HashingWriter, build_manifest, manifest_problems


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(str(checkpoint), tmp_path_factory.mktemp("manifest") / "mlx", ConvertOptions()).out


def _recorded(folder: Path) -> dict[str, FileRecord]:
    record = json.loads((folder / "conversion.json").read_text())
    return {name: FileRecord.from_dict(entry) for name, entry in record["manifest"].items()}


def test_the_manifest_lists_every_file_with_its_hash(converted: Path) -> None:
    recorded = _recorded(converted)
    on_disk = sorted(p.relative_to(converted).as_posix() for p in converted.rglob("*")
                     if p.is_file() and p.name != "conversion.json")
    assert sorted(recorded) == on_disk and "model.safetensors" in recorded
    for name, entry in recorded.items():
        data = (converted / name).read_bytes()
        assert entry == FileRecord(len(data), "sha256:" + hashlib.sha256(data).hexdigest()), name
    assert manifest_problems(converted, recorded) == []


def test_changes_are_named(converted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in _recorded(converted):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((converted / name).read_bytes())
    recorded = build_manifest(folder)
    assert recorded == _recorded(converted)
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # same size, one bit flipped
    (folder / "model.safetensors").write_bytes(bytes(weights))
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    tokenizer = sorted(name for name in recorded if name.startswith("tokenizer/"))[0]
    (folder / tokenizer).unlink()
    (folder / "notes.txt").write_text("added")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # the Hub's own file is not ours
    assert manifest_problems(folder, recorded) == [
        f"{tokenizer}: missing (the manifest lists it)",
        "notes.txt: not in the manifest (added after the conversion)",
        f"config.json: {recorded['config.json'].size + 1} bytes, the manifest says {recorded['config.json'].size}",
        "model.safetensors: sha256 differs from the manifest (same size, changed content)",
    ]


def test_the_hashing_writer_hashes_what_it_wrote_in_order(tmp_path: Path) -> None:
    chunks = [bytes([index]) * (3 << 20) for index in range(9)]  # more than its queue holds at once
    with (tmp_path / "out").open("wb") as raw, HashingWriter(raw) as handle:
        for chunk in chunks:
            handle.write(memoryview(chunk))
    written = (tmp_path / "out").read_bytes()
    assert written == b"".join(chunks)
    assert handle.record() == FileRecord(len(written), "sha256:" + hashlib.sha256(written).hexdigest())


def test_the_hashing_writer_gives_its_thread_back_when_a_write_fails(tmp_path: Path) -> None:
    threads = threading.active_count()
    with pytest.raises(BufferError):
        with (tmp_path / "out").open("wb") as raw, HashingWriter(raw) as handle:
            handle.write(b"header")
            handle.write(memoryview(np.arange(16)[::2]))  # not contiguous: neither the file nor the hash takes it
    assert threading.active_count() == threads
    with HashingWriter(io.BytesIO()) as still_open, pytest.raises(RuntimeError, match="before the writer was closed"):
        still_open.record()
