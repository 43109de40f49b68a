"""The `.nemo` reader against real NeMo archives and hand-made hostile ones."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from canary_convert.archive import CONFIG_MEMBER, WEIGHTS_MEMBER, open_archive
from canary_convert.errors import ArchiveError, UnsafeArchiveError


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {info.name.removeprefix("./"): tar.extractfile(info).read() for info in tar if info.isfile()}


def _write_tar(path: Path, members: dict[str, bytes], mode: str = "w", extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def test_reads_nemo_save_to_archive(checkpoint: Path) -> None:
    import nemo.collections.asr as nemo_asr

    with open_archive(checkpoint) as archive:
        config = archive.config()
        artifacts = archive.artifacts(config)
        with archive.state_dict() as state:
            reference = nemo_asr.models.EncDecMultiTaskModel.restore_from(str(checkpoint), map_location="cpu").state_dict()
            assert sorted(state) == sorted(reference)
            for key, tensor in reference.items():
                assert torch.equal(state[key], tensor), key
    assert config["target"] == "nemo.collections.asr.models.aed_multitask_models.EncDecMultiTaskModel"
    # every nemo: reference resolves to a member: 3 files (model, vocab, spe vocab) per sub-tokenizer
    assert {a.config_path for a in artifacts} == {
        f"tokenizer.langs.{lang}.{field}"
        for lang in ("spl_tokens", "en", "de")
        for field in ("model_path", "vocab_path", "spe_tokenizer_vocab")
    }
    assert all(a.member in archive.members for a in artifacts)


def test_tar_gz_and_extracted_folder_read_the_same(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    gz = _write_tar(tmp_path / "model.nemo", members, mode="w:gz")
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    with open_archive(checkpoint) as plain, open_archive(gz) as packed, open_archive(folder) as extracted:
        assert plain.config() == packed.config() == extracted.config()
        with plain.state_dict() as a, packed.state_dict() as b, extracted.state_dict() as c:
            assert sorted(a) == sorted(b) == sorted(c)
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def _mapped_files(address: int) -> set[str]:
    """The files mapped at `address` in this process, from /proc/self/maps."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= address < high and len(fields) == 6:
            found.add(fields[5])
    return found


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the mappings")
def test_plain_tar_weights_are_mapped_in_place(checkpoint: Path) -> None:
    reference = torch.load(io.BytesIO(_members(checkpoint)[WEIGHTS_MEMBER]), weights_only=True)
    with open_archive(checkpoint) as archive, archive.state_dict() as state:
        assert sorted(state) == sorted(reference)
        for key, tensor in reference.items():
            assert torch.equal(state[key], tensor) and state[key].stride() == tensor.stride(), key
            # the tensor's bytes are pages of the .nemo itself: no copy, no temporary file
            assert _mapped_files(state[key].data_ptr()) == {str(checkpoint.resolve())}, key


def _central_entry(ckpt: bytes, suffix: str) -> int:
    """Where the central-directory entry of the record whose name ends with `suffix` starts."""
    name = next(n for n in zipfile.ZipFile(io.BytesIO(ckpt)).namelist() if n.endswith(suffix)).encode()
    start = ckpt.index(b"PK\x01\x02")
    while ckpt[start + 46 : start + 46 + len(name)] != name:
        start = ckpt.index(b"PK\x01\x02", start + 1)
    return start


def _with_field(ckpt: bytes, suffix: str, offsets: tuple[int, ...], value: int) -> bytes:
    """The checkpoint with 32-bit fields of one record's central-directory entry set to `value`."""
    patched = bytearray(ckpt)
    entry = _central_entry(ckpt, suffix)
    for offset in offsets:
        struct.pack_into("<I", patched, entry + offset, value)
    return bytes(patched)


# Central-directory fields (zip spec): compressed size at 20, uncompressed size at 24, local header offset at 42.
@pytest.mark.parametrize(
    ("offsets", "value", "message"),
    [
        ((42,), 1 << 30, r"record \S+/data/0 starts at 1073741824, outside the member"),
        ((42,), 7, r"record \S+/data/0 has no local header at offset 7"),
        ((20, 24), 12, r"record \S+/data/0 holds 12 bytes, but its \d+ torch\.\w+ elements need \d+"),
    ],
)
def test_corrupt_storage_record_is_refused(checkpoint: Path, tmp_path: Path, offsets: tuple[int, ...],
                                           value: int, message: str) -> None:
    members = _members(checkpoint)
    members[WEIGHTS_MEMBER] = _with_field(members[WEIGHTS_MEMBER], "/data/0", offsets, value)
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(ArchiveError, match=r"m\.nemo:model_weights\.ckpt: " + message):
            with archive.state_dict():
                pass


def test_config_interpolations_are_resolved(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    config = yaml.safe_load(members[CONFIG_MEMBER])
    config["encoder"]["d_model"] = "${model_defaults.asr_enc_hidden}"
    members[CONFIG_MEMBER] = yaml.safe_dump(config).encode()
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        assert archive.config()["encoder"]["d_model"] == config["model_defaults"]["asr_enc_hidden"]


def test_corrupt_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.nemo"
    path.write_bytes(b"this is not a tar archive at all" * 50)
    with pytest.raises(ArchiveError, match=r"corrupt\.nemo: not a readable \.nemo archive"):
        open_archive(path)


def test_truncated_archive_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.nemo"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="truncated"):
        with open_archive(path) as archive, archive.state_dict():
            pass


@pytest.mark.parametrize("missing", [CONFIG_MEMBER, WEIGHTS_MEMBER])
def test_missing_core_member_is_named(checkpoint: Path, tmp_path: Path, missing: str) -> None:
    members = _members(checkpoint)
    del members[missing]
    with pytest.raises(ArchiveError, match=f"member '{missing}' is missing"):
        open_archive(_write_tar(tmp_path / "m.nemo", members))


def test_missing_tokenizer_artifact_is_named(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    config = yaml.safe_load(members[CONFIG_MEMBER])
    lost = config["tokenizer"]["langs"]["en"]["model_path"].removeprefix("nemo:")
    del members[lost]
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(ArchiveError, match=f"tokenizer.langs.en.model_path refers to 'nemo:{lost}'"):
            archive.artifacts(archive.config())


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../evil.txt", tarfile.REGTYPE, "climbs out"),
        ("./sub/../../evil.txt", tarfile.REGTYPE, "climbs out"),
        ("/etc/evil.txt", tarfile.REGTYPE, "absolute path"),
        ("./link", tarfile.SYMTYPE, "is a link"),
        ("./hard", tarfile.LNKTYPE, "is a link"),
        ("./dev", tarfile.CHRTYPE, "device or special file"),
        ("./fifo", tarfile.FIFOTYPE, "device or special file"),
    ],
)
def test_hostile_members_are_refused(checkpoint: Path, tmp_path: Path, name: str, kind: bytes, message: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = 4 if kind == tarfile.REGTYPE else 0
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    path = _write_tar(tmp_path / "hostile.nemo", _members(checkpoint), extra=[info])
    with pytest.raises(UnsafeArchiveError, match=message):
        open_archive(path)
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_in_extracted_folder_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, data in _members(checkpoint).items():
        (folder / name).write_bytes(data)
    (folder / "escape").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="'escape' is a link"):
        open_archive(folder)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_pickle_that_weights_only_refuses_is_reported(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    buffer = io.BytesIO()
    torch.save({"encoder.weight": torch.zeros(2), "payload": _Exploit()}, buffer)
    members[WEIGHTS_MEMBER] = buffer.getvalue()
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(UnsafeArchiveError, match="model_weights.ckpt: refused by torch's weights-only loader"):
            with archive.state_dict():
                pass


def test_weights_that_are_not_a_state_dict_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    buffer = io.BytesIO()
    torch.save([torch.zeros(2)], buffer)
    members[WEIGHTS_MEMBER] = buffer.getvalue()
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(ArchiveError, match="expected a state dict of named tensors"):
            with archive.state_dict():
                pass


def test_config_with_python_tags_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    members = _members(checkpoint)
    members[CONFIG_MEMBER] = b"target: !!python/object/apply:os.system ['echo pwned']\n"
    with open_archive(_write_tar(tmp_path / "m.nemo", members)) as archive:
        with pytest.raises(ArchiveError, match="model_config.yaml is not safe, plain YAML"):
            archive.config()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="nowhere.nemo: no such file"):
        open_archive(tmp_path / "nowhere.nemo")
