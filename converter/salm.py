"""A NeMo speechlm2 SALM checkpoint (canary-qwen) as the Hub holds it: a folder with SALM's `config.json` and
safetensors weights, and the LLM's tokenizer and config, which the checkpoint only names (`pretrained_llm`).

The weights are mapped, never copied whole: each tensor is a view of the mapped file until it is used.
The LLM's files come from, in order: `--llm-source PATH`; the files NeMo 3.0 saves beside the checkpoint
(the tokenizer at its root, `llm_backbone/config.json`); `pretrained_llm` when it is a local folder; else
`pretrained_llm` as a Hub repo, through huggingface_hub's cache (config and tokenizer files only, by name).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import EntryNotFoundError

from .checkpoint_zip import MappedSource, MappedTensors
from .errors import ArchiveError, ModelFolderError, SourceError
from .untrusted import folder_file, read_json
from .model.cpu.mapped import map_safetensors
from .source import _REPO_ID, SPEECH_LLM_CONFIG as SALM_CONFIG, SPEECH_LLM_INDEX as SALM_INDEX
from .source import SPEECH_LLM_WEIGHTS as SALM_WEIGHTS, _HubRequest, _hub_download, _hub_errors

LLM_BACKBONE = "llm_backbone"  # NeMo 3.0's HFHubMixin: the LLM's config saved beside the checkpoint
TOKENIZER_CONFIG = "tokenizer_config.json"
# What the LLM folder contributes: its config and tokenizer (its weights are the checkpoint's); the config first.
LLM_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def read_salm_config(folder: Path) -> dict[str, Any] | None:
    """SALM's config when `folder` holds one (its `pretrained_llm` and `perception` say so), else None."""
    path = folder / SALM_CONFIG
    if not path.is_file():
        return None
    config = read_json(path, ArchiveError)  # bounded in size and depth: a checkpoint folder comes from anywhere
    return config if isinstance(config, dict) and "pretrained_llm" in config and "perception" in config else None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors: one file, or the shards its index names."""
    index = folder / SALM_INDEX
    if index.is_file():
        data = read_json(index, ArchiveError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ArchiveError(f"{index}: not a safetensors index (no weight_map of tensor names to file names)")
        # Each a regular file inside the folder: an index may name any path (untrusted.py).
        files = [folder_file(folder, name, SALM_INDEX, ArchiveError) for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / SALM_WEIGHTS]
    for file in files:
        if not file.is_file():
            raise ArchiveError(f"{file}: missing; a SALM checkpoint keeps its weights in {SALM_WEIGHTS} (or shards)")
    return files


def _as_torch(view: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the mapping is read-only; nothing writes to it
        tensor = torch.from_numpy(view.view)
    # numpy has no bfloat16: those bytes are mapped as uint16 and reinterpreted.
    return tensor.view(torch.bfloat16) if str(view.dtype) == "mlx.core.bfloat16" else tensor


def mapped_state_dict(folder: Path) -> MappedTensors:
    """Every tensor of the checkpoint as a torch view of its mapped file (no copy until used); a file cut
    short while mapped is an ArchiveError at the next lookup instead of a SIGBUS (checkpoint_zip.py)."""
    tensors: dict[str, torch.Tensor] = {}
    sources = []
    for file in weight_files(folder):
        handle = file.open("rb")  # held by the check below for its fstat; closed with the state dict
        sources.append(MappedSource(str(file), os.fstat(handle.fileno()).st_size,
                                    lambda handle=handle: os.fstat(handle.fileno()).st_size))
        try:
            mapped = map_safetensors(file)
        except ModelFolderError as exc:
            raise ArchiveError(str(exc)) from None
        tensors.update((key, _as_torch(view)) for key, view in mapped.items())
    return MappedTensors(tensors, sources)


@dataclass(frozen=True)
class LlmSource:
    """Where the LLM's config and tokenizer files are, and where they came from (for conversion.json)."""

    config_folder: Path
    tokenizer_folder: Path
    origin: dict[str, Any]

    def llm_config(self) -> dict[str, Any]:
        path = self.config_folder / "config.json"
        config = read_json(path, SourceError)
        if not isinstance(config, dict):
            raise SourceError(f"{path}: the LLM's config is not a JSON object")
        return config


def _require_llm_folder(path: Path, what: str) -> Path:
    for name in ("config.json", TOKENIZER_CONFIG):
        if not (path / name).is_file():
            raise SourceError(f"{path}: {what} lacks {name} (the LLM's config and tokenizer files are needed)")
    return path


def resolve_llm(folder: Path, config: Mapping[str, Any], llm_source: str | None = None,
                tqdm_class: Any = None) -> LlmSource:
    """Find the LLM's config and tokenizer for the SALM checkpoint in `folder` (see the module's order)."""
    if llm_source is not None:
        path = _require_llm_folder(Path(llm_source).expanduser(), "--llm-source")
        return LlmSource(path, path, {"kind": "folder", "path": str(path)})
    if (folder / LLM_BACKBONE / "config.json").is_file() and (folder / TOKENIZER_CONFIG).is_file():
        return LlmSource(folder / LLM_BACKBONE, folder, {"kind": "beside the checkpoint", "path": str(folder)})
    name = str(config.get("pretrained_llm", ""))
    local = Path(name).expanduser()
    if local.is_dir():
        path = _require_llm_folder(local, "pretrained_llm")
        return LlmSource(path, path, {"kind": "folder", "path": str(path)})
    if not _REPO_ID.match(name):
        raise SourceError(f"{folder / SALM_CONFIG}: pretrained_llm {name!r} is neither a folder nor a Hub repo id; "
                          "pass --llm-source PATH (a folder with the LLM's config.json and tokenizer files)")
    instead = f"pass --llm-source PATH, a folder holding {name}'s config.json and tokenizer files"
    path = None
    for file in LLM_FILES:
        # The first file is probed once: an unreachable Hub fails in seconds, not after huggingface_hub's retries.
        with _hub_errors(_HubRequest(name, None, "the file", instead, file)):
            try:
                path = _hub_download(name, file, None, tqdm_class).parent
            except EntryNotFoundError:
                continue  # a tokenizer has some of these files, not all
    if path is None:
        raise SourceError(f"{name}: the Hub repo has none of an LLM's config and tokenizer files; {instead}")
    _require_llm_folder(path, f"the Hub repo {name}")
    commit = path.name if path.parent.name == "snapshots" else None
    return LlmSource(path, path, {"kind": "hub", "id": name, "commit": commit, "path": str(path)})
