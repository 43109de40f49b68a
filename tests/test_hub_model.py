"""A published folder used by its Hub repo id: `load_model("ORG/NAME")`, `canary-transcribe --model ORG/NAME` and
`canary-convert verify --against ORG/NAME`, against the loopback Hub (hub_upload_server.py) that the folder was
uploaded to with `canary-convert upload`, then offline from huggingface_hub's cache.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, so every Hub case runs in a
child process whose environment reaches 127.0.0.1 only (`loopback_env`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.manifest import CONVERSION_FILE
from canary_convert.parity import reference_signals
from conftest import REPO, run_cli
from hub_server import loopback_env
from hub_upload_server import HubUploadServer

TOKEN = "hf_modeltoken0123456789"
ORG = "mlx-org"
REPO_ID = f"{ORG}/tiny-canary-mlx"

_LOAD_SCRIPT = r"""
import json, sys
from canary_convert import load_model
from canary_convert.errors import CanaryConvertError
args = json.loads(sys.argv[1])
try:
    model = load_model(args["model"], args["revision"])
except CanaryConvertError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    tokens = [t.tokens for t in model.transcribe(args["audio"], source_lang="en", strategy="greedy")]
    print(json.dumps({"tokens": tokens, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nemo"))}))
"""


def load_in_subprocess(model: str, env: dict[str, str], audio: Path, revision: str | None = None) -> dict[str, Any]:
    """`load_model(model, revision)` in a fresh interpreter, then greedy tokens of `audio`, or the error."""
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT,
                           json.dumps({"model": model, "revision": revision, "audio": str(audio)})],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def transcribe_cli(model: str, audio: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "canary-transcribe"), str(audio), "--model", model,
                           "--source-lang", "en", "--greedy", "--json", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def cli_tokens(result: subprocess.CompletedProcess[str]) -> list[list[int]]:
    assert result.returncode == 0, result.stderr
    return [record["tokens"] for record in json.loads(result.stdout)]


def one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1, one `error:` line holding every fragment, and no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def folders(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two conversions of one checkpoint, float32 (published first) and float16 (published over it)."""
    root = tmp_path_factory.mktemp("hub-model")
    return {dtype: convert(str(checkpoint), root / dtype, ConvertOptions(dtype=dtype, license="cc-by-4.0")).out
            for dtype in ("float32", "float16")}


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    soundfile.write(path, reference_signals(16000)[0], 16000)
    return path


@pytest.fixture(scope="module")
def local_tokens(folders: dict[str, Path], audio: Path) -> dict[str, list[list[int]]]:
    """Greedy tokens of each folder loaded from its local path: what every Hub load must give."""
    return {dtype: [t.tokens for t in load_model(folder).transcribe(str(audio), source_lang="en", strategy="greedy")]
            for dtype, folder in folders.items()}


@pytest.fixture
def hub() -> Iterator[HubUploadServer]:
    with HubUploadServer(TOKEN, writable={ORG}) as server:
        yield server


def publish(folder: Path, hub: HubUploadServer, tmp_path: Path) -> str:
    """`canary-convert upload FOLDER ORG/NAME` to the loopback Hub; the new commit of main."""
    result = run_cli("upload", str(folder), REPO_ID, env=loopback_env(tmp_path / "uploader", hub.url, token=TOKEN))
    assert result.returncode == 0, result.stderr
    return hub.repo(REPO_ID).head().oid


def snapshot_of(home: Path, commit: str) -> Path:
    return home.resolve() / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / commit


def test_a_published_folder_loads_by_repo_id(folders: dict[str, Path], local_tokens: dict, audio: Path,
                                            hub: HubUploadServer, tmp_path: Path) -> None:
    """load_model and canary-transcribe by repo id give the local folder's tokens; exactly conversion.json and the
    files its manifest lists are fetched (no .gitattributes), and torch is never imported."""
    commit = publish(folders["float32"], hub, tmp_path)
    uploaded = len(hub.requests)
    home = tmp_path / "hf-home"
    env = loopback_env(home, hub.url)

    loaded = load_in_subprocess(REPO_ID, env, audio)

    assert loaded.get("tokens") == local_tokens["float32"], loaded
    assert loaded["modules"] == []
    manifest = json.loads((folders["float32"] / CONVERSION_FILE).read_text())["manifest"]
    reads = hub.requests[uploaded:]
    wanted = sorted([*manifest, CONVERSION_FILE])
    asked = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in reads if "/resolve/" in r.path}
    assert sorted(asked) == wanted
    lfs = hub.repo(REPO_ID).head().lfs
    assert len([r for r in reads if r.server == "storage"]) == len(lfs) > 0  # each LFS file fetched once
    assert all("authorization" not in r.headers for r in reads)  # a public repo needs no token
    snapshot = snapshot_of(home, commit)
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == wanted

    assert cli_tokens(transcribe_cli(REPO_ID, audio, env)) == local_tokens["float32"]


def test_a_pinned_revision_loads_that_commit(folders: dict[str, Path], local_tokens: dict, audio: Path,
                                            hub: HubUploadServer, tmp_path: Path) -> None:
    """After a second upload moved main, `revision=<first commit>` (and --revision) load the first folder; main
    loads the second. The two differ in dtype, so the folder each load read is known from its weights too."""
    first = publish(folders["float32"], hub, tmp_path)
    second = publish(folders["float16"], hub, tmp_path)
    assert first != second
    home = tmp_path / "hf-home"
    env = loopback_env(home, hub.url)

    pinned = load_in_subprocess(REPO_ID, env, audio, revision=first)
    latest = load_in_subprocess(REPO_ID, env, audio)

    assert pinned.get("tokens") == local_tokens["float32"], pinned
    assert latest.get("tokens") == local_tokens["float16"], latest
    for commit, dtype in ((first, "float32"), (second, "float16")):
        config = json.loads((snapshot_of(home, commit) / "config.json").read_text())
        assert config == json.loads((folders[dtype] / "config.json").read_text())
    assert cli_tokens(transcribe_cli(REPO_ID, audio, env, "--revision", first)) == local_tokens["float32"]
    one_error_line(transcribe_cli(REPO_ID, audio, env, "--revision", "no-such-branch"),
                   f"{REPO_ID}@no-such-branch: the repo has no revision 'no-such-branch'")


def test_offline_from_the_cache(folders: dict[str, Path], local_tokens: dict, audio: Path, hub: HubUploadServer,
                                tmp_path: Path, dead_endpoint: str) -> None:
    """Once fetched, the repo loads with HF_HUB_OFFLINE (and the Hub gone), at main and at its pinned commit;
    a repo the cache lacks is one clear line, at once."""
    commit = publish(folders["float32"], hub, tmp_path)
    home = tmp_path / "hf-home"
    assert load_in_subprocess(REPO_ID, loopback_env(home, hub.url), audio).get("tokens") == local_tokens["float32"]
    offline = loopback_env(home, dead_endpoint, offline=True)

    assert load_in_subprocess(REPO_ID, offline, audio).get("tokens") == local_tokens["float32"]
    assert load_in_subprocess(REPO_ID, offline, audio, revision=commit).get("tokens") == local_tokens["float32"]
    assert cli_tokens(transcribe_cli(REPO_ID, audio, offline)) == local_tokens["float32"]
    gone = loopback_env(home, dead_endpoint)  # not offline: the Hub refuses connections
    assert cli_tokens(transcribe_cli(REPO_ID, audio, gone)) == local_tokens["float32"]

    for env in (offline, gone):
        one_error_line(transcribe_cli(f"{ORG}/absent", audio, env),
                       f"{ORG}/absent: the Hugging Face Hub cannot be reached", "the repo is not in the local cache")


def test_each_file_is_hashed_once_unless_it_changes(folders: dict[str, Path], local_tokens: dict, audio: Path,
                                                    hub: HubUploadServer, tmp_path: Path, dead_endpoint: str) -> None:
    """A file is hashed when fetched and recorded as checked (huggingface_hub's assets cache); a cached blob
    changed after that (one byte flipped in place) is hashed again and refused, offline too."""
    commit = publish(folders["float32"], hub, tmp_path)
    home = tmp_path / "hf-home"
    assert load_in_subprocess(REPO_ID, loopback_env(home, hub.url), audio).get("tokens") == local_tokens["float32"]
    manifest = json.loads((folders["float32"] / CONVERSION_FILE).read_text())["manifest"]
    checked = home / "assets" / "canary-convert" / REPO_ID.replace("/", "--") / "checked"
    assert sorted(path.name for path in checked.iterdir()) == sorted(
        {entry["sha256"].removeprefix("sha256:") for entry in manifest.values()})
    blob = (snapshot_of(home, commit) / "model.safetensors").resolve()
    with blob.open("r+b") as handle:
        handle.seek(blob.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))

    loaded = load_in_subprocess(REPO_ID, loopback_env(home, dead_endpoint, offline=True), audio)

    assert loaded.get("error") == "ModelFolderError", loaded
    assert "model.safetensors: sha256 differs from the manifest" in loaded["message"]


def test_a_flipped_byte_in_the_served_weights_is_refused(folders: dict[str, Path], audio: Path,
                                                         hub: HubUploadServer, tmp_path: Path) -> None:
    """The Hub serves model.safetensors with one byte flipped (size and headers unchanged): load_model,
    canary-transcribe and verify refuse it, naming the file, before the model loads."""
    publish(folders["float32"], hub, tmp_path)
    hub.tamper(REPO_ID, "model.safetensors")
    env = loopback_env(tmp_path / "hf-home", hub.url)

    loaded = load_in_subprocess(REPO_ID, env, audio)

    assert loaded.get("error") == "ModelFolderError", loaded
    assert "model.safetensors: sha256 differs from the manifest" in loaded["message"]
    one_error_line(transcribe_cli(REPO_ID, audio, env), "model.safetensors: sha256 differs from the manifest")
    one_error_line(run_cli("verify", REPO_ID, env=env), "model.safetensors: sha256 differs from the manifest")


def test_a_repo_that_is_not_a_canary_convert_folder(folders: dict[str, Path], audio: Path, hub: HubUploadServer,
                                                    tmp_path: Path) -> None:
    """No conversion.json: one line saying so. A conversion.json whose manifest names a path outside the folder:
    refused before anything else is fetched."""
    hub.add_repo(f"{ORG}/other", {"README.md": b"# some other model\n", "model.safetensors": b"\0" * 64})
    record = json.loads((folders["float32"] / CONVERSION_FILE).read_text())
    record["manifest"]["../../escape.txt"] = {"size": 1, "sha256": "sha256:" + "0" * 64}
    hub.add_repo(f"{ORG}/escape", {CONVERSION_FILE: json.dumps(record).encode()})
    env = loopback_env(tmp_path / "hf-home", hub.url)

    one_error_line(transcribe_cli(f"{ORG}/other", audio, env),
                   f"{ORG}/other: not a canary-convert folder (the repo has no {CONVERSION_FILE})")
    one_error_line(transcribe_cli(f"{ORG}/escape", audio, env),
                   f"{ORG}/escape@", "manifest names '../../escape.txt': not a plain file name inside the folder")
    assert not any("escape.txt" in r.path or "model.safetensors" in r.path for r in hub.requests)


def test_a_model_that_is_neither_a_folder_nor_a_repo(folders: dict[str, Path], audio: Path, hub: HubUploadServer,
                                                     tmp_path: Path) -> None:
    """A name that is no local folder and no repo, and a revision given with a local folder: one line each."""
    env = loopback_env(tmp_path / "hf-home", hub.url)
    one_error_line(transcribe_cli("build/no-such-folder", audio, env),
                   "build/no-such-folder: no such local folder, and no such repo on the Hub")
    result = transcribe_cli(str(folders["float32"]), audio, env, "--revision", "main")
    assert result.returncode == 2 and "a local folder has no revision" in result.stderr, result.stderr


def test_verify_names_a_file_added_to_the_repo(folders: dict[str, Path], local_tokens: dict, audio: Path,
                                               hub: HubUploadServer, tmp_path: Path) -> None:
    """A file pushed to the repo after the upload is not fetched, yet verify names it from the repo's listing;
    load_model fetches the manifest's files only and loads as before."""
    publish(folders["float32"], hub, tmp_path)
    hub.push(REPO_ID, {"notes.txt": b"added after the conversion\n"})
    env = loopback_env(tmp_path / "hf-home", hub.url)

    result = run_cli("verify", REPO_ID, "--json", str(tmp_path / "report.json"), env=env)
    loaded = load_in_subprocess(REPO_ID, env, audio)

    assert result.returncode == 3, result.stdout + result.stderr
    manifest = next(check for check in json.loads((tmp_path / "report.json").read_text())["checks"]
                    if check["name"] == "manifest")
    assert manifest["status"] == "fail" and manifest["file"] == "notes.txt", manifest
    assert manifest["detail"] == "notes.txt: in the repo but not in the manifest (added after the conversion)"
    assert loaded.get("tokens") == local_tokens["float32"], loaded
    assert not any("notes.txt" in r.path for r in hub.requests)


def test_verify_against_a_repo_id(folders: dict[str, Path], hub: HubUploadServer, tmp_path: Path) -> None:
    """`verify LOCAL --against ORG/NAME [--against-revision R]` compares the local folder with the published one
    (at R), tensor by tensor."""
    first = publish(folders["float32"], hub, tmp_path)
    publish(folders["float16"], hub, tmp_path)
    env = loopback_env(tmp_path / "hf-home", hub.url)

    pinned = run_cli("verify", str(folders["float32"]), "--against", REPO_ID, "--against-revision", first, env=env)
    latest = run_cli("verify", str(folders["float32"]), "--against", REPO_ID, env=env)

    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert latest.returncode == 3, latest.stdout + latest.stderr
