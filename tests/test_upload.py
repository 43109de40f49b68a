"""`canary-convert upload`: the real huggingface_hub client, end to end, against a loopback Hub over Git LFS.

Folders (model card included) come from the real converter on a NeMo-built checkpoint. Every run goes through
the CLI in a child process whose environment reaches 127.0.0.1 only (`loopback_env`: Xet off, HF_HOME empty,
HF_TOKEN as given).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import soundfile

from canary_convert import __version__, load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.manifest import CONVERSION_FILE, FileRecord
from canary_convert.parity import reference_signals
from conftest import run_cli
from hub_server import loopback_env
from hub_upload_server import HubUploadServer, is_lfs

TOKEN = "hf_uploadtoken0123456789"
ORG = "canary-org"
REPO_ID = f"{ORG}/tiny-canary-mlx"
def manifest_of(folder: Path) -> dict[str, FileRecord]:
    record = json.loads((folder / CONVERSION_FILE).read_text())
    return {name: FileRecord.from_dict(entry) for name, entry in record["manifest"].items()}


def _convert(checkpoint: Path, out: Path, options: ConvertOptions) -> Path:
    folder = convert(str(checkpoint), out, options).out
    assert folder is not None
    return folder


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = ConvertOptions(license="cc-by-4.0", base_model="nvidia/canary-1b")
    return _convert(checkpoint, tmp_path_factory.mktemp("upload") / "mlx", options)


@pytest.fixture
def folder(converted: Path, tmp_path: Path) -> Path:
    """A copy of the converted folder that a test may change."""
    return Path(shutil.copytree(converted, tmp_path / "mlx"))


@pytest.fixture
def hub() -> Iterator[HubUploadServer]:
    with HubUploadServer(TOKEN, writable={ORG}) as server:
        yield server


def upload_cli(folder: Path, endpoint: str, hf_home: Path, *args: str, repo_id: str = REPO_ID,
               token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    hf_home.mkdir(exist_ok=True)
    return run_cli("upload", str(folder), repo_id, *args, env=loopback_env(hf_home, endpoint, token=token))


def assert_fails(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1 and one `error:` line holding every fragment, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.stderr


def large_files(folder: Path) -> list[str]:
    return sorted(name for name, entry in manifest_of(folder).items() if is_lfs(name, entry.size))


# --- the upload arrives -------------------------------------------------------------------------------------


def test_upload_arrives_byte_for_byte(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """Every manifest file and conversion.json in one commit on main, each equal in size and sha256 to the
    manifest; the large files went through LFS storage, which never saw the token."""
    result = upload_cli(converted, hub.url, tmp_path / "hf")

    assert result.returncode == 0, result.stderr
    repo = hub.repo(REPO_ID)
    assert not repo.private and list(repo.branches) == ["main"]
    initial, commit = repo.branches["main"]
    assert f"canary-convert {__version__}" in commit.summary
    assert commit.oid[:12] in result.stdout and REPO_ID in result.stdout
    manifest = manifest_of(converted)
    assert set(commit.files) == {*manifest, CONVERSION_FILE, ".gitattributes"}
    for name, entry in manifest.items():
        arrived = commit.files[name]
        assert arrived == (converted / name).read_bytes(), name
        assert FileRecord(len(arrived), "sha256:" + hashlib.sha256(arrived).hexdigest()) == entry, name
    assert commit.files[CONVERSION_FILE] == (converted / CONVERSION_FILE).read_bytes()
    lfs = large_files(converted)
    assert "model.safetensors" in lfs and any(name.startswith("tokenizer/") for name in lfs)
    assert sorted(commit.lfs) == lfs
    assert sorted(hub.stored) == sorted(manifest[name].sha256.removeprefix("sha256:") for name in lfs)
    for request in hub.requests:
        if request.server == "storage":
            assert "authorization" not in request.headers
        elif request.path != "/api/validate-yaml":
            assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path


def test_only_the_manifest_is_uploaded(folder: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """Files a folder may carry beside a conversion (.gitattributes, huggingface_hub's .cache) stay home."""
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("local")

    result = upload_cli(folder, hub.url, tmp_path / "hf")

    assert result.returncode == 0, result.stderr
    files = hub.repo(REPO_ID).head().files
    assert set(files) == {*manifest_of(folder), CONVERSION_FILE, ".gitattributes"}
    assert files[".gitattributes"] != (folder / ".gitattributes").read_bytes()  # the Hub's own, untouched


def test_private_repo_on_a_new_branch(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """--private creates the repo private; --revision commits to that branch (created from main), not to main."""
    result = upload_cli(converted, hub.url, tmp_path / "hf", "--private", "--revision", "dev")

    assert result.returncode == 0, result.stderr
    repo = hub.repo(REPO_ID)
    assert repo.private
    assert len(repo.branches["main"]) == 1  # the Hub's initial commit only
    assert set(repo.head("dev").files) == {*manifest_of(converted), CONVERSION_FILE, ".gitattributes"}
    assert f"{REPO_ID}@dev" in result.stdout


def test_existing_repo_is_updated(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """The Hub answers 409 to creating a repo that exists; the upload commits on top of what it holds."""
    hub.add_repo(REPO_ID, {"notes.md": b"kept\n"})

    result = upload_cli(converted, hub.url, tmp_path / "hf")

    assert result.returncode == 0, result.stderr
    files = hub.repo(REPO_ID).head().files
    assert files["notes.md"] == b"kept\n" and files["model.safetensors"] == (converted / "model.safetensors").read_bytes()
    assert ("hub", "POST", "/api/repos/create") in [(r.server, r.method, r.path) for r in hub.requests]


def test_private_refuses_an_existing_public_repo(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    hub.add_repo(REPO_ID, {})

    result = upload_cli(converted, hub.url, tmp_path / "hf", "--private")

    assert_fails(result, f"{REPO_ID} already exists and is public", "--private", "nothing was uploaded")
    assert len(hub.repo(REPO_ID).branches["main"]) == 1 and hub.stored == {}


# --- the Hub refuses or fails -------------------------------------------------------------------------------


def test_bad_token_is_401(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    result = upload_cli(converted, hub.url, tmp_path / "hf", token="hf_not_the_right_one")

    assert_fails(result, f"{REPO_ID}: the Hub rejected the token (401", "hf auth login", "nothing was uploaded")
    assert not hub.has_repo(REPO_ID)


def test_namespace_without_write_access_is_403(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    result = upload_cli(converted, hub.url, tmp_path / "hf", repo_id="someone-else/tiny-canary-mlx")

    assert_fails(result, "the token may not write to someone-else (403 Forbidden", "nothing was uploaded")


def test_unknown_repo_is_404(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    hub.fail("create", 404, "Repository not found", code="RepoNotFound")

    result = upload_cli(converted, hub.url, tmp_path / "hf")

    assert_fails(result, "the Hub does not know this repo, or the token cannot see it (404)", "nothing was uploaded")


def test_storage_failure_mid_upload_says_what_was_stored(folder: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """The second large file's PUT keeps failing (503, retried by huggingface_hub): the first one is in storage,
    the rest is not, and no commit was made. Run again, the upload finishes without sending the first again."""
    hub.fail("storage-put", 503, "Slow Down", skip=1, headers={"Retry-After": "0"})
    first = large_files(folder)[0]

    result = upload_cli(folder, hub.url, tmp_path / "hf")

    assert_fails(result, "the Hub failed (503 Service Unavailable: Slow Down)",
                 f"large files stored before the failure: {first};", "no commit was made")
    not_uploaded = result.stderr.split("not uploaded: ", 1)[1].split(";", 1)[0].split(", ")
    assert sorted(not_uploaded) == sorted({*manifest_of(folder), CONVERSION_FILE} - {first})
    first_oid = manifest_of(folder)[first].sha256.removeprefix("sha256:")
    assert list(hub.stored) == [first_oid]
    assert len(hub.repo(REPO_ID).branches["main"]) == 1

    hub.recover()
    again = upload_cli(folder, hub.url, tmp_path / "hf")

    assert again.returncode == 0, again.stderr
    assert set(hub.repo(REPO_ID).head().files) == {*manifest_of(folder), CONVERSION_FILE, ".gitattributes"}
    assert [r.path for r in hub.requests if r.server == "storage"].count(f"/upload/{first_oid}") == 1


def test_commit_failure_leaves_the_repo_as_it_was(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    hub.fail("commit", 500)

    result = upload_cli(converted, hub.url, tmp_path / "hf")

    assert_fails(result, "the Hub failed (500", "every large file reached the Hub's storage but no commit was made")
    assert len(hub.stored) == len(large_files(converted))
    assert len(hub.repo(REPO_ID).branches["main"]) == 1


def test_refused_connection(converted: Path, tmp_path: Path, dead_endpoint: str) -> None:
    result = upload_cli(converted, dead_endpoint, tmp_path / "hf")

    assert_fails(result, f"cannot reach the Hub at {dead_endpoint}", "nothing was uploaded")


# --- refused before any request -----------------------------------------------------------------------------


def _drop_conversion(folder: Path) -> None:
    (folder / CONVERSION_FILE).unlink()


def _edit_record(key: str, value: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        record = json.loads((folder / CONVERSION_FILE).read_text())
        record[key] = value
        (folder / CONVERSION_FILE).write_text(json.dumps(record))
    return edit


def _flip_a_weight_bit(folder: Path) -> None:
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(weights))


@pytest.mark.parametrize(("spoil", "expected"), [
    (_drop_conversion, "not a canary-convert folder (conversion.json is missing): only a folder written by canary-convert can be uploaded"),
    (_edit_record("validation", None), "does not record a passed validation"),
    (_edit_record("parity", {"passed": False}), "records a parity check with NeMo that did not pass"),
    (_flip_a_weight_bit, "changed since the conversion: model.safetensors: sha256 differs from the manifest"),
], ids=["no-conversion-json", "failed-validation", "failed-parity", "changed-file"])
def test_unfit_folder_is_refused_before_any_request(
    folder: Path, hub: HubUploadServer, tmp_path: Path, spoil: Callable[[Path], None], expected: str
) -> None:
    spoil(folder)

    result = upload_cli(folder, hub.url, tmp_path / "hf")

    assert_fails(result, f"{folder}: ", expected, "nothing was uploaded")
    assert hub.requests == []


def test_unknown_licence_is_refused(checkpoint: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """A local .nemo converted without --license gets `license: unknown` on its card: never published silently."""
    folder = _convert(checkpoint, tmp_path / "mlx", ConvertOptions())

    result = upload_cli(folder, hub.url, tmp_path / "hf")

    assert_fails(result, f"{folder}: README.md names no licence (license: unknown)", "--license", "nothing was uploaded")
    assert hub.requests == []


def test_no_token_says_how_to_log_in(converted: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    result = upload_cli(converted, hub.url, tmp_path / "hf", token=None)

    assert_fails(result, "not logged in to the Hugging Face Hub", "HF_TOKEN", "hf auth login")
    assert hub.requests == []


# --- convert and publish in one command ---------------------------------------------------------------------


def test_convert_with_upload_repo(checkpoint: Path, hub: HubUploadServer, tmp_path: Path) -> None:
    """`canary-convert SOURCE OUT --quantize 8 --upload-repo ORG/NAME`: the quantized folder, its card naming the
    repo in its usage, in one commit."""
    (tmp_path / "hf").mkdir()
    env = loopback_env(tmp_path / "hf", hub.url, token=TOKEN)
    result = run_cli(str(checkpoint), str(tmp_path / "q8"), "--quantize", "8", "--q-group-size", "32",
                     "--license", "cc-by-4.0", "--upload-repo", REPO_ID, env=env)
    assert result.returncode == 0, result.stderr
    files = hub.repo(REPO_ID).head().files
    assert set(files) == {*manifest_of(tmp_path / "q8"), CONVERSION_FILE, ".gitattributes"}
    card = files["README.md"].decode()
    assert f"--upload-repo {REPO_ID}" in card and f'load_model("{REPO_ID}")' in card and "hf download" not in card
    # The card's own command line, as written, transcribes from the published repo.
    command = next(line for line in card.splitlines() if line.startswith("canary-transcribe "))
    assert command == f"canary-transcribe speech.wav --model {REPO_ID} --source-lang en"
    soundfile.write(tmp_path / "speech.wav", reference_signals(16000)[0], 16000)
    words = command.split()
    result = subprocess.run([str(Path(sys.executable).parent / words[0]), *words[1:], "--json"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    local = load_model(tmp_path / "q8").transcribe(str(tmp_path / "speech.wav"), source_lang="en")
    assert [record["tokens"] for record in json.loads(result.stdout)] == [t.tokens for t in local]


def test_upload_options_are_checked_before_converting(checkpoint: Path, tmp_path: Path, dead_endpoint: str) -> None:
    (tmp_path / "hf").mkdir()
    result = run_cli(str(checkpoint), str(tmp_path / "out"), "--private")
    assert result.returncode == 2 and "--private and --upload-revision need --upload-repo" in result.stderr
    result = run_cli(str(checkpoint), str(tmp_path / "out"), "--upload-repo", REPO_ID,
                     env=loopback_env(tmp_path / "hf", dead_endpoint, token=None))
    assert result.returncode == 1 and "HF_TOKEN" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any conversion
