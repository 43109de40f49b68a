"""SOURCE resolution: local paths, and Hub repo ids through the real huggingface_hub against loopback servers.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, so every Hub case runs
`resolve_source` in a fresh interpreter with a controlled environment and reads back JSON. Nothing here leaves
127.0.0.1: the environment drops every HF_*/proxy variable, and HF_ENDPOINT always points at a loopback port
(a live fake Hub, or a bound-but-not-listening socket that refuses connections).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canary_convert.errors import HubFileMissingError, HubUnreachableError, SourceError
from canary_convert.source import SourceDigest, hub_cache_sha256, hub_filename, resolve_source
from conftest import run_cli
from hub_cache import repo_cache, seed_cache
from hub_server import HubServer, commit_id, loopback_env

REPO_ID = "owner/tiny-canary"
FILENAME = "tiny-canary.nemo"  # hub_filename(REPO_ID)
CONTENT = b"not really a tar, but bytes the cache must keep exactly\x00\x01\xff" * 37
TOKEN = "hf_testtoken0123456789"

_RESOLVE_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
sleeps = []
if args["no_sleep"]:
    # huggingface_hub backs off (1+2+4+8+8 s) before giving up on an unreachable Hub: record, do not wait.
    time.sleep = sleeps.append
from canary_convert.errors import SourceError
from canary_convert.source import resolve_source
try:
    resolved = resolve_source(args["source"], revision=args["revision"])
except SourceError as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
else:
    out = {"provenance": resolved.provenance()}
out["sleeps"] = sleeps
print(json.dumps(out))
"""


class ResolverCrashed(Exception):
    """`resolve_source` let a non-SourceError escape (the CLI would show a traceback)."""


def resolve_in_subprocess(
    source: str,
    *,
    hf_home: Path,
    endpoint: str,
    revision: str | None = None,
    offline: bool = False,
    token: str | None = None,
    no_sleep: bool = False,
) -> dict[str, Any]:
    """Run `resolve_source` in a fresh interpreter; return `{"provenance": ...}` or `{"error", "message"}`."""
    env = loopback_env(hf_home, endpoint, offline=offline, token=token)
    args = {"source": source, "revision": revision, "no_sleep": no_sleep}
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT, json.dumps(args)],
        capture_output=True, text=True, env=env, cwd=hf_home, timeout=60,
    )
    if done.returncode != 0:
        raise ResolverCrashed(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_unreachable(result: dict[str, Any], repo_id: str = REPO_ID) -> None:
    """The error users get when the Hub is out of reach: names the repo and says how to pass a local file."""
    assert result.get("error") == HubUnreachableError.__name__, result
    assert issubclass(HubUnreachableError, SourceError)
    message = result["message"]
    filename = hub_filename(repo_id)
    assert message.startswith(f"{repo_id}/{filename}"), message
    assert "not in the local cache" in message
    assert f"pass its path: canary-convert ./{filename} OUT" in message


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """An empty HF_HOME (so an empty Hub cache and no stored token)."""
    home = tmp_path / "hf-home"
    home.mkdir()
    return home


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A fake Hub (and CDN) on loopback ports."""
    with HubServer() as server:
        yield server


# --- Hub cache, offline -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pinned", [False, True], ids=["main", "commit"])
def test_offline_resolves_from_hand_built_cache(hf_home: Path, dead_endpoint: str, pinned: bool) -> None:
    """HF_HUB_OFFLINE=1 and the file in the cache: the snapshot path and its commit, via refs/main or pinned."""
    commit = commit_id("offline")
    snapshot = seed_cache(hf_home, REPO_ID, FILENAME, CONTENT, commit)
    revision = commit if pinned else None

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=dead_endpoint, offline=True, revision=revision)

    assert result["provenance"] == {
        "kind": "hub",
        "path": str(snapshot),
        "id": REPO_ID,
        "revision": commit if pinned else "main",
        "commit": commit,
    }
    assert Path(result["provenance"]["path"]).read_bytes() == CONTENT


@pytest.mark.parametrize("cached", ["nothing", "other-commit"])
def test_offline_not_cached_is_hub_unreachable(hf_home: Path, dead_endpoint: str, cached: str) -> None:
    """Offline with an empty cache, or asking for a commit the cache does not hold: HubUnreachableError."""
    revision = None
    if cached == "other-commit":
        seed_cache(hf_home, REPO_ID, FILENAME, CONTENT, commit_id("cached"))
        revision = commit_id("not cached")

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=dead_endpoint, offline=True, revision=revision)

    assert_unreachable(result)
    if revision:
        assert f"@{revision}" in result["message"]


# --- Hub unreachable (not offline) --------------------------------------------------------------------------


def test_unreachable_hub_not_cached_is_hub_unreachable(hf_home: Path, dead_endpoint: str) -> None:
    """Connection refused and nothing cached: HubUnreachableError at once, without huggingface_hub's retries."""
    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=dead_endpoint, no_sleep=True)

    assert_unreachable(result)
    assert result["sleeps"] == []


def test_cli_answers_at_once_when_the_hub_refuses(hf_home: Path, dead_endpoint: str, tmp_path: Path) -> None:
    """`canary-convert owner/name OUT` with the Hub out of reach and nothing cached: exit 1, the local-file hint,
    and no retry backoff (huggingface_hub alone waits about 23 s; the bound is a guard, not a benchmark)."""
    started = time.monotonic()
    result = run_cli(REPO_ID, str(tmp_path / "mlx"), env=loopback_env(hf_home, dead_endpoint))
    seconds = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    assert f"{REPO_ID}/{FILENAME}: the Hugging Face Hub cannot be reached" in result.stderr
    assert f"canary-convert ./{FILENAME} OUT" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "mlx").exists()
    assert seconds < 10


def test_cli_with_a_cached_checkpoint_does_not_wait_for_the_card(
    hf_home: Path, dead_endpoint: str, tmp_path: Path, checkpoint: Path
) -> None:
    """The .nemo cached, the Hub out of reach and its model card not cached: the conversion goes on at once
    with an unknown licence, no retry backoff for the card either (a guard, not a benchmark)."""
    seed_cache(hf_home, REPO_ID, FILENAME, checkpoint.read_bytes(), commit_id("cached checkpoint"))
    started = time.monotonic()
    result = run_cli(REPO_ID, str(tmp_path / "mlx"), env=loopback_env(hf_home, dead_endpoint))
    seconds = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert "license: unknown" in (tmp_path / "mlx" / "README.md").read_text()
    assert seconds < 10


def test_unreachable_hub_falls_back_to_cache(hf_home: Path, dead_endpoint: str) -> None:
    """Connection refused but the file cached: the cached snapshot, without waiting for retries."""
    commit = commit_id("fallback")
    snapshot = seed_cache(hf_home, REPO_ID, FILENAME, CONTENT, commit)

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=dead_endpoint)

    assert result["provenance"]["path"] == str(snapshot)
    assert result["provenance"]["commit"] == commit
    assert result["sleeps"] == []


# --- Hub download from the loopback server ------------------------------------------------------------------


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
def test_download_then_offline_cache_hit(hf_home: Path, hub: HubServer, lfs: bool) -> None:
    """First resolve probes, then downloads byte-identical content; offline and pinned resolves hit the cache only."""
    repo = hub.add_repo(REPO_ID, {FILENAME: CONTENT, "README.md": b"# tiny\n"}, lfs=lfs)
    folder = repo_cache(hf_home, REPO_ID)
    expected_path = folder / "snapshots" / repo.commit / FILENAME

    first = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url)

    assert first["provenance"] == {
        "kind": "hub", "path": str(expected_path), "id": REPO_ID, "revision": "main", "commit": repo.commit,
    }
    blob = folder / "blobs" / repo.etag(FILENAME)
    assert blob.read_bytes() == CONTENT
    assert expected_path.is_symlink() and expected_path.resolve() == blob
    assert (folder / "refs" / "main").read_text() == repo.commit
    resolve_url = f"/{REPO_ID}/resolve/main/{FILENAME}"
    download_url = f"/blobs/{repo.etag(FILENAME)}" if lfs else resolve_url
    assert [(r.server, r.method, r.path) for r in hub.requests] == [
        ("hub", "HEAD", resolve_url),  # the unretried probe: is the Hub there at all?
        ("hub", "HEAD", resolve_url),  # hf_hub_download's own metadata request
        ("cdn" if lfs else "hub", "GET", download_url),
    ]
    assert all("authorization" not in r.headers for r in hub.requests)

    hub.clear_requests()
    offline = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url, offline=True)
    pinned = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url, revision=repo.commit)

    assert offline["provenance"] == first["provenance"]
    assert pinned["provenance"] == {**first["provenance"], "revision": repo.commit}
    assert hub.requests == []  # offline makes no request; a cached pinned commit needs none


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
def test_source_sha256_comes_from_the_cache_for_lfs_files(hf_home: Path, hub: HubServer, lfs: bool) -> None:
    """An LFS download's cache blob is named by its sha256: conversion.json takes it without reading the file."""
    hub.add_repo(REPO_ID, {FILENAME: CONTENT}, lfs=lfs)
    path = Path(resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url)["provenance"]["path"])
    expected = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    assert hub_cache_sha256(path) == (expected if lfs else None)
    assert SourceDigest(path).result() == expected


def test_cached_main_is_checked_but_not_downloaded_again(hf_home: Path, hub: HubServer) -> None:
    """Online with `main` cached: one HEAD to learn the commit, no second GET."""
    repo = hub.add_repo(REPO_ID, {FILENAME: CONTENT})
    resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url)
    hub.clear_requests()

    again = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url)

    assert again["provenance"]["commit"] == repo.commit
    assert [r.method for r in hub.requests] == ["HEAD"]


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
def test_hf_token_is_sent_as_bearer(hf_home: Path, hub: HubServer, lfs: bool) -> None:
    """HF_TOKEN goes to the Hub as `Authorization: Bearer <token>`, and never to the CDN an LFS file lives on."""
    repo = hub.add_repo(REPO_ID, {FILENAME: CONTENT}, lfs=lfs)

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url, token=TOKEN)

    assert Path(result["provenance"]["path"]).read_bytes() == CONTENT
    assert result["provenance"]["commit"] == repo.commit
    hub_requests = [r for r in hub.requests if r.server == "hub"]
    cdn_requests = [r for r in hub.requests if r.server == "cdn"]
    assert [r.method for r in hub_requests] == (["HEAD", "HEAD"] if lfs else ["HEAD", "HEAD", "GET"])
    assert [r.headers.get("authorization") for r in hub_requests] == [f"Bearer {TOKEN}"] * len(hub_requests)
    assert [r.method for r in cdn_requests] == (["GET"] if lfs else [])
    assert all("authorization" not in r.headers for r in cdn_requests)


def test_unknown_repo_is_source_error(hf_home: Path, hub: HubServer) -> None:
    """A repo the Hub does not know (401 RepoNotFound): SourceError naming the repo."""
    result = resolve_in_subprocess("nobody/missing-model", hf_home=hf_home, endpoint=hub.url)

    assert result["error"] == SourceError.__name__, result
    assert result["message"].startswith("nobody/missing-model/missing-model.nemo: no such repo on the Hub")
    assert "HF_TOKEN" in result["message"]


def test_repo_without_nemo_file_is_source_error(hf_home: Path, hub: HubServer) -> None:
    """The repo exists but has no `<name>.nemo` (404 EntryNotFound): SourceError naming repo and file."""
    hub.add_repo(REPO_ID, {"model.safetensors": b"\0" * 8})

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url)

    # A SourceError of its own kind: a repo without the .nemo may still be a speech-LLM's (config.json).
    assert result["error"] == HubFileMissingError.__name__ and issubclass(HubFileMissingError, SourceError), result
    assert result["message"] == f"{REPO_ID}/{FILENAME}: the repo has no file {FILENAME}"


def test_unknown_revision_is_source_error(hf_home: Path, hub: HubServer) -> None:
    """A revision the repo does not have (404 RevisionNotFound): SourceError naming repo and revision."""
    hub.add_repo(REPO_ID, {FILENAME: CONTENT})

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url, revision="v9")

    assert result["error"] == SourceError.__name__, result
    assert result["message"] == f"{REPO_ID}/{FILENAME}@v9: the repo has no revision 'v9'"


def test_download_cut_short_is_source_error(hf_home: Path, hub: HubServer) -> None:
    """The connection drops mid-download (after huggingface_hub's resume attempts): a SourceError, no traceback."""
    hub.add_repo(REPO_ID, {FILENAME: CONTENT})
    hub.truncate_downloads = True

    result = resolve_in_subprocess(REPO_ID, hf_home=hf_home, endpoint=hub.url, no_sleep=True)

    assert result["error"] in {SourceError.__name__, HubUnreachableError.__name__}, result
    assert result["message"].startswith(f"{REPO_ID}/{FILENAME}")
    assert not (repo_cache(hf_home, REPO_ID) / "snapshots").exists() or not any(
        (repo_cache(hf_home, REPO_ID) / "snapshots").rglob(FILENAME)
    )


# --- Local paths (never reach huggingface_hub, so they run in-process) --------------------------------------


def test_local_file(tmp_path: Path) -> None:
    """An existing file: kind `file`, the path as given."""
    nemo = tmp_path / "model.nemo"
    nemo.write_bytes(CONTENT)

    resolved = resolve_source(str(nemo))

    assert resolved.provenance() == {"kind": "file", "path": str(nemo)}


def test_local_folder(tmp_path: Path) -> None:
    """An existing folder (an extracted checkpoint): kind `folder`."""
    resolved = resolve_source(str(tmp_path))

    assert resolved.provenance() == {"kind": "folder", "path": str(tmp_path)}


def test_local_folder_shaped_like_a_repo_id_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`owner/name` that exists on disk is the local folder, not a Hub download."""
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    resolved = resolve_source("owner/name")

    assert (resolved.kind, resolved.path) == ("folder", Path("owner/name"))


@pytest.mark.parametrize("source", ["./missing.nemo", "missing.nemo", "a/b/c", "owner/model.nemo", "/no/such/dir"])
def test_missing_path_that_is_not_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """A path that does not exist and cannot be a repo id: SourceError naming it."""
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SourceError) as caught:
        resolve_source(source)

    assert not isinstance(caught.value, HubUnreachableError)
    assert str(caught.value).startswith(f"{source}: no such file or folder")


@pytest.mark.parametrize("source", ["owner/bad--name", "owner/a..b", "owner/-name", "owner/name."])
def test_repo_id_the_hub_rejects_is_source_error(hf_home: Path, dead_endpoint: str, source: str) -> None:
    """`owner/name` shapes huggingface_hub refuses before any request: SourceError naming the source."""
    result = resolve_in_subprocess(source, hf_home=hf_home, endpoint=dead_endpoint, offline=True)

    assert result["error"] == SourceError.__name__, result
    assert source in result["message"]
