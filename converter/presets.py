"""Model-family presets (`configs/*.yaml`): detect the family, refuse what the MLX model cannot run,
and derive the MLX `config.json` from the NeMo config and the tensors' shapes."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import torch
import yaml

from .archive import Artifact
from .errors import CanaryConvertError, RulesFileError, UnsupportedModelError, UsageError
from .model.config import ConfigValueError, SpeechConfig, without_paths
from .model.load import config_from_dict

_MISSING = object()
_ARTIFACT_ID = re.compile(r"^[0-9a-f]{32}_")  # NeMo prefixes each artifact with a uuid4 hex


def lookup(config: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """`lookup(cfg, "a.b")` is `cfg["a"]["b"]`; a missing step gives `default` (or raises KeyError)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


@dataclass(frozen=True)
class Layout:
    """A folder layout for another library: its parameter names (a mapping file), what it needs of the
    checkpoint, where the tokenizer files go, and the config.json entries it reads beside ours."""

    name: str
    mapping: str
    requires: dict[str, Any]
    why: str
    tokenizer_folder: str
    config: dict[str, Any]
    quantize_refused: str = ""  # why `--quantize` cannot serve that library (empty: it can)
    refused: str = ""  # why that library cannot serve this family at all (empty: it can)


# canary-convert's own layout: the bundled model's names, mappings/canary.yaml, the tokenizer under tokenizer/.
OWN_LAYOUT = "mlx"


@dataclass(frozen=True)
class Preset:
    name: str
    file: str
    mapping: str
    detect: dict[str, Any]
    supports: dict[str, list[Any]]
    config: dict[str, Any]
    summary: str = ""  # one line for the model card: what this family is
    licenses: dict[str, str] = field(default_factory=dict)  # Hub repo id -> licence of NVIDIA's own releases
    layouts: dict[str, Layout] = field(default_factory=dict)
    kind: str = "aed"  # "speech-llm": a SALM checkpoint folder, converted by convert_salm.py
    audio: dict[str, Any] = field(default_factory=dict)  # speech-llm: whose FastConformer tables, under which root
    llm: dict[str, Any] = field(default_factory=dict)  # speech-llm: the LLM's keys, mapping, families, LoRA targets

    def layout(self, name: str, nemo_config: Mapping[str, Any]) -> Layout | None:
        """The layout `--layout NAME` asks for (None: canary-convert's own), refused up front when this
        checkpoint lacks what that layout's library needs."""
        if name == OWN_LAYOUT:
            return None
        if name not in self.layouts:
            known = ", ".join([OWN_LAYOUT, *sorted(self.layouts)])
            raise UsageError(f"--layout {name!r}: choose one of {known}")
        layout = self.layouts[name]
        if layout.refused:
            raise UnsupportedModelError(f"{self.name}: --layout {name} cannot serve this checkpoint: {layout.refused}")
        found = {key: lookup(nemo_config, key, None) for key in layout.requires}
        if any(found[key] != want for key, want in layout.requires.items()):
            needs = ", ".join(f"{key}={want!r}" for key, want in layout.requires.items())
            has = ", ".join(f"{key}={value!r}" for key, value in found.items())
            raise UnsupportedModelError(f"{self.name}: --layout {name} cannot serve this checkpoint: {layout.why}; "
                                        f"it needs {needs}, this checkpoint has {has}")
        return layout

    def matches(self, nemo_config: Mapping[str, Any]) -> bool:
        """Every `detect` field has its value; `{present: true|false}` asks only whether the field is set."""
        return all(_detects(lookup(nemo_config, key, None), want) for key, want in self.detect.items())


def _detects(value: Any, want: Any) -> bool:
    if isinstance(want, dict) and set(want) == {"present"}:
        return (value is not None) == bool(want["present"])
    return value == want


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@cache
def _raw_presets() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in resources.files("canary_convert.configs").iterdir():
        if not entry.name.endswith(".yaml"):
            continue
        try:
            raw = yaml.safe_load(entry.read_bytes())
        except yaml.YAMLError as exc:
            raise RulesFileError(f"configs/{entry.name}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict) or "name" not in raw:
            raise RulesFileError(f"configs/{entry.name}: expected a mapping with a 'name'")
        raw["file"] = f"configs/{entry.name}"
        found[raw["name"]] = raw
    return found


def _resolve(name: str, raw: dict[str, dict[str, Any]], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise RulesFileError(f"presets extend each other in a loop: {' -> '.join(seen + (name,))}")
    entry = raw[name]
    parent = entry.get("extends")
    if parent is None:
        return entry
    if parent not in raw:
        raise RulesFileError(f"{entry['file']}: extends unknown preset {parent!r}")
    return _deep_merge(_resolve(parent, raw, seen + (name,)), entry)


def resolved_preset(name: str) -> dict[str, Any]:
    """A preset's entries as its file and those it extends give them (abstract ones too)."""
    raw = _raw_presets()
    if name not in raw:
        raise RulesFileError(f"no preset named {name!r}")
    return _resolve(name, raw)


@cache
def presets() -> tuple[Preset, ...]:
    """Every concrete preset shipped with the package, with `extends` resolved."""
    raw = _raw_presets()
    resolved = []
    for name in sorted(raw):
        if raw[name].get("abstract"):
            continue
        entry = _resolve(name, raw)
        try:
            resolved.append(
                Preset(
                    name=name,
                    file=entry["file"],
                    mapping=entry["mapping"],
                    detect=dict(entry.get("detect", {})),
                    supports=dict(entry.get("supports", {})),
                    config=dict(entry["config"]),
                    summary=str(entry.get("summary", "")),
                    licenses=dict(entry.get("licenses", {})),
                    layouts={layout: Layout(name=layout, mapping=spec["mapping"], requires=dict(spec.get("requires", {})),
                                            why=str(spec.get("why", "")), tokenizer_folder=spec["tokenizer_folder"],
                                            config=dict(spec.get("config", {})),
                                            quantize_refused=str(spec.get("quantize_refused", "")),
                                            refused=str(spec.get("refused", "")))
                             for layout, spec in entry.get("layouts", {}).items()},
                    kind=str(entry.get("kind", "aed")),
                    audio=dict(entry.get("audio", {})),
                    llm=dict(entry.get("llm", {})),
                )
            )
        except KeyError as exc:
            raise RulesFileError(f"{entry['file']}: missing {exc}") from None
    return tuple(resolved)


def detect_preset(nemo_config: Mapping[str, Any]) -> Preset:
    """The one preset whose `detect` fields all match, after checking the model is one we can run."""
    found = [preset for preset in presets() if preset.matches(nemo_config)]
    if not found:
        described = ", ".join(
            f"{key}={lookup(nemo_config, key, None)!r}" for key in ("target", "prompt_format", "tokenizer.type")
        )
        known = ", ".join(preset.name for preset in presets())
        raise UnsupportedModelError(f"no preset matches this checkpoint ({described}); known families: {known}")
    if len(found) > 1:
        raise RulesFileError(f"presets {', '.join(p.name for p in found)} all match; their 'detect' overlap")
    preset = found[0]
    for key, allowed in preset.supports.items():
        value = lookup(nemo_config, key, None)
        if value not in allowed:
            raise UnsupportedModelError(
                f"{preset.name}: model_config.yaml has {key}={value!r}; the bundled MLX model supports "
                f"{', '.join(repr(a) for a in allowed)}"
            )
    return preset


def _derive(spec: Any, where: str, nemo_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
            members: Collection[str]) -> Any:
    if not isinstance(spec, dict):
        raise RulesFileError(f"{where}: expected a mapping, got {spec!r}")
    if "from" in spec:
        try:
            return lookup(nemo_config, spec["from"], spec.get("default", _MISSING))
        except KeyError:
            raise UnsupportedModelError(f"model_config.yaml lacks {spec['from']}, needed for {where}") from None
    if "value" in spec:
        return spec["value"]
    if "has_key" in spec:
        return spec["has_key"] in tensors
    if "has_members" in spec:
        return all(member in members for member in spec["has_members"])
    if "shape_of" in spec:
        key = spec["shape_of"]
        if key not in tensors:
            raise UnsupportedModelError(f"the checkpoint lacks tensor {key}, needed for {where}")
        return int(tensors[key].shape[int(spec.get("dim", 0))])
    # A nested section of config.json.
    return {name: _derive(sub, f"{where}.{name}", nemo_config, tensors, members) for name, sub in spec.items()}


@dataclass(frozen=True)
class Derived:
    """The MLX config and which archive members become which tokenizer files in OUT.

    With another library's layout, `foreign` holds the config.json entries that library reads; they are
    merged over ours (`config_json`), which stay what the bundled model reads.
    """

    preset: Preset
    config: SpeechConfig
    tokenizer_files: dict[str, str]  # path inside OUT -> archive member
    layout: Layout | None = None
    foreign: dict[str, Any] = field(default_factory=dict)

    def config_json(self) -> dict[str, Any]:
        return _deep_merge(self.config.to_dict(), self.foreign)


def _tokenizer_layout(nemo_config: Mapping[str, Any], artifacts: list[Artifact],
                      root: str = "tokenizer") -> tuple[dict[str, Any], dict[str, str]]:
    """Place tokenizer artifacts under `root` by NeMo's own names (`<uuid>_tokenizer.model` -> `tokenizer.model`)."""
    kind = str(lookup(nemo_config, "tokenizer.type", "")).lower()
    files: dict[str, str] = {}

    def place(artifact: Artifact, folder: str) -> str:
        placed = (PurePosixPath(folder) / _ARTIFACT_ID.sub("", PurePosixPath(artifact.member).name)).as_posix()
        files[placed] = artifact.member
        return placed

    if kind == "agg":
        langs: dict[str, str] = {}
        for lang in lookup(nemo_config, "tokenizer.langs", {}):
            prefix = f"tokenizer.langs.{lang}."
            for artifact in artifacts:
                if artifact.config_path.startswith(prefix):
                    placed = place(artifact, f"{root}/{lang}")
                    if artifact.config_path == prefix + "model_path":
                        langs[lang] = placed
            if lang not in langs:
                raise UnsupportedModelError(f"model_config.yaml: tokenizer.langs.{lang} has no nemo: model_path")
        return {"type": "aggregate", "langs": langs}, files
    model = None
    for artifact in artifacts:
        if artifact.config_path.startswith("tokenizer."):
            placed = place(artifact, root)
            if artifact.config_path == "tokenizer.model_path":
                model = placed
    if model is None:
        raise UnsupportedModelError("model_config.yaml: tokenizer has no nemo: model_path")
    return {"type": "bpe", "model": model}, files


def _bad_value(preset: Preset, layout: Layout | None, exc: ConfigValueError) -> CanaryConvertError:
    """A derived value config.json cannot hold, blamed on where it came from: the NeMo config key, the
    tensor whose shape gave it, or (a constant) the preset itself."""
    for table in ([layout.config] if layout is not None else []) + [preset.config]:
        leaf: Any = table
        for part in exc.path.split("."):
            leaf = leaf.get(part) if isinstance(leaf, dict) else None
        if isinstance(leaf, dict) and "from" in leaf:
            return UnsupportedModelError(f"model_config.yaml: {leaf['from']}: {exc.problem} (config.json "
                                         f"{exc.path})")
        if isinstance(leaf, dict) and "shape_of" in leaf:
            return UnsupportedModelError(f"tensor {leaf['shape_of']}: its shape gives config.json {exc.path}: "
                                         f"{exc.problem}")
    return RulesFileError(f"{preset.file}: the derived config does not fit config.json: {exc}")


def foreign_paths(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of `theirs` that `ours` lacks: the entries only the other library reads (the rest
    set values of ours, which the bundled model must accept)."""
    paths = []
    for key, value in theirs.items():
        if key not in ours:
            paths.append(prefix + key)
        elif isinstance(value, dict) and isinstance(ours[key], dict):
            paths += foreign_paths(ours[key], value, f"{prefix}{key}.")
    return paths


def derive_config(
    preset: Preset, nemo_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], artifacts: list[Artifact],
    layout: Layout | None = None,
    members: Collection[str] = (),
) -> Derived:
    """Build the MLX `config.json` from the preset's derivation table (and the layout's, when one is asked for);
    `members` are the archive's file names."""
    values = _derive(preset.config, "config", nemo_config, tensors, members)
    values["family"] = preset.name
    root = layout.tokenizer_folder if layout is not None else "tokenizer"
    values["tokenizer"], files = _tokenizer_layout(nemo_config, artifacts, root)
    foreign = {}
    if layout is not None:
        foreign = _derive(layout.config, f"layout {layout.name}", nemo_config, tensors, members)
    try:
        # Entries the layout sets in our own sections must still be valid for the bundled model.
        config = config_from_dict(_deep_merge(values, without_paths(foreign, foreign_paths(values, foreign))))
    except ConfigValueError as exc:
        raise _bad_value(preset, layout, exc) from None
    except ValueError as exc:
        raise RulesFileError(f"{preset.file}: the derived config does not fit config.json: {exc}") from None
    return Derived(preset=preset, config=config, tokenizer_files=files, layout=layout, foreign=foreign)
