"""A Hugging Face Hub cache laid out by hand, exactly as `hf_hub_download` leaves it, for offline tests."""

from __future__ import annotations

import os
from pathlib import Path

from hub_server import git_blob_sha1


def repo_cache(hf_home: Path, repo_id: str) -> Path:
    """huggingface_hub's folder for a model repo: `<HF_HOME>/hub/models--owner--name` (HF_HOME resolved)."""
    return hf_home.resolve() / "hub" / ("models--" + repo_id.replace("/", "--"))


def seed_cache(hf_home: Path, repo_id: str, filename: str, content: bytes, commit: str) -> Path:
    """Lay a file out exactly as `hf_hub_download` would have (`main` pointing at `commit`); return its snapshot path.

    Several files of one repo and commit can be seeded one after another."""
    folder = repo_cache(hf_home, repo_id)
    etag = git_blob_sha1(content)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / etag).write_bytes(content)
    snapshot = folder / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(folder / "blobs" / etag, snapshot.parent))  # relative, as the cache does
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)  # no newline: huggingface_hub reads it verbatim
    return snapshot
