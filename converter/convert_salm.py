"""The speech-LLM conversion (canary-qwen, NeMo speechlm2 SALM): one source, two folders of weights.

The audio half (front end, FastConformer, projection) goes through salm-audio.yaml into canary-convert's
layout at OUT's top; the LLM (its keys split off by the preset) through salm-llm.yaml into `OUT/llm`, a
folder mlx_lm.load() reads as it is: the LLM's own config.json (with mlx-lm's quantization entry when
quantized), its tokenizer with SALM's audio placeholder added, and safetensors in mlx-lm's names with the
LoRA adapters merged. Both are proven like a Canary folder (strict load, exact round trip); one manifest,
one conversion.json and one card cover both.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
from mlx.utils import tree_flatten

from . import __version__, llm_goldens
from .card import CARD_FILE, _provenance, choose_licence
from .errors import UnsupportedModelError
from .goldens import GOLDENS_FILE
from .manifest import CONVERSION_FILE, FileRecord, build_manifest
from .model.llm.config import SpeechLLMConfig
from .model.llm.speechllm import AudioEncoder, SpeechLLM
from .model.load import CONFIG_FILE
from .model.quantized import quantize_modules
from .presets import Preset, _derive, detect_preset, lookup, resolved_preset
from .quantize import QuantizationPlan, check_quantized_tree, plan_quantization
from .rules import Plan, load_rules, plan_conversion
from .salm import LlmSource, mapped_state_dict, resolve_llm, weight_files
from .source import ResolvedSource, SourceDigest, source_card_licence
from .validate import ValidationReport, check_round_trip
from .writer import OutputTensor, TensorBytes, output_tensors, staged_output, write_json, write_weights

LORA_SCALE = "lora_scale"  # the value salm-llm.yaml's merges name


@dataclass
class Part:
    """One folder of weights: its plan over its share of the source keys, and what it stores."""

    folder: str  # inside OUT ("" for the top)
    plan: Plan
    source: dict[str, torch.Tensor]
    quantization: QuantizationPlan | None = None
    stored: list[OutputTensor] = field(default_factory=list)
    files: dict[str, FileRecord] = field(default_factory=dict)
    errors: list[Any] = field(default_factory=list)

    def sources(self) -> Any:
        return self.plan.sources(self.source)


@dataclass
class SalmConversion:
    source: ResolvedSource
    preset: Preset
    config: SpeechLLMConfig
    llm: LlmSource
    llm_config: dict[str, Any]
    lora: dict[str, Any] | None
    audio: Part
    language_model: Part
    out: Path | None = None
    validation: ValidationReport | None = None
    manifest: dict[str, FileRecord] = field(default_factory=dict)

    @property
    def parts(self) -> tuple[Part, Part]:
        return self.audio, self.language_model


def _check_audio_supports(preset: Preset, config: dict[str, Any]) -> dict[str, Any]:
    """The FastConformer half of SALM's config, checked against the encoder preset's `supports`."""
    spec = preset.audio
    root = lookup(config, spec["root"], None)
    if not isinstance(root, dict):
        raise UnsupportedModelError(f"{preset.name}: config.json lacks its {spec['root']} section")
    base = resolved_preset(spec["preset"])
    for key, allowed in base.get("supports", {}).items():
        if key.split(".", 1)[0] in spec["sections"] and lookup(root, key, None) not in allowed:
            raise UnsupportedModelError(
                f"{preset.name}: config.json has {spec['root']}.{key}={lookup(root, key, None)!r}; the bundled MLX "
                f"model supports {', '.join(repr(a) for a in allowed)}")
    return root


def _lora(preset: Preset, config: dict[str, Any]) -> dict[str, Any] | None:
    """SALM's LoRA settings, refused unless the mapping merges every target, with alpha / r."""
    lora = config.get("lora")
    if lora is None:
        return None
    targets = lora.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    known = preset.llm["lora_targets"]
    unknown = sorted(set(targets) - set(known))
    if not targets or unknown:
        raise UnsupportedModelError(f"{preset.name}: LoRA target_modules {targets!r}: {', '.join(unknown) or 'none'} "
                                    f"outside the linear layers the mapping merges ({', '.join(known)})")
    rank, alpha = int(lora["r"]), float(lora.get("lora_alpha", 8))
    return {"r": rank, "alpha": alpha, "scale": alpha / rank, "targets": sorted(targets),
            "merge": "W + alpha/r * B @ A in float32, then stored at the folder's dtype"}


def _llm_model(llm_config: dict[str, Any], preset: Preset, quantized: set[str] | None = None) -> Any:
    """mlx-lm's model for the LLM's config (lazily allocated), in its quantized form when asked."""
    from mlx_lm.utils import _get_classes

    model_type = llm_config.get("model_type")
    if model_type not in preset.llm["families"]:
        raise UnsupportedModelError(f"{preset.name}: the LLM is a {model_type!r} model; the mapping serves "
                                    f"{', '.join(preset.llm['families'])}")
    model_class, args_class = _get_classes(llm_config)
    model = model_class(args_class.from_dict(llm_config))
    if quantized is not None and "quantization" in llm_config:
        quantize_modules(model, llm_config["quantization"], {f"{path}.scales" for path in quantized})
    return model


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def plan_salm(source: ResolvedSource, salm_config: dict[str, Any], options: Any, llm_source: str | None = None,
              tqdm_class: Any = None) -> SalmConversion:
    """Everything but writing: the preset's checks, the LLM's files found, both plans proven complete."""
    preset = detect_preset(salm_config)
    if preset.kind != "speech-llm":
        raise UnsupportedModelError(f"{source.path}: a SALM config.json, but preset {preset.name} is not a speech-LLM")
    folder = source.path
    audio_root = _check_audio_supports(preset, salm_config)
    lora = _lora(preset, salm_config)
    llm = resolve_llm(folder, salm_config, llm_source, tqdm_class)
    llm_config = llm.llm_config()
    state = mapped_state_dict(folder)
    is_llm = re.compile(preset.llm["keys"])
    llm_state = state.subset(key for key in state if is_llm.match(key))
    audio_state = state.subset(key for key in state if key not in llm_state)

    values = _derive(preset.config, "config", salm_config, state, ())
    for section in preset.audio["sections"]:
        base = resolved_preset(preset.audio["preset"])["config"][section]
        values[section] = _derive(base, f"config.{section}", audio_root, state, ())
    values.update(family=preset.name, llm_model_type=llm_config.get("model_type"))
    config = SpeechLLMConfig.from_dict(values)

    audio = Part("", plan_conversion(load_rules(preset.mapping), audio_state, _shapes(AudioEncoder(config))), audio_state)
    model = _llm_model(llm_config, preset)
    rows = int(llm_state["embed_tokens.weight"].shape[0]) if "embed_tokens.weight" in llm_state else None
    if rows != llm_config.get("vocab_size"):
        raise UnsupportedModelError(f"{folder}: embed_tokens.weight has {rows} rows, the LLM's config says "
                                    f"vocab_size {llm_config.get('vocab_size')}")
    language_model = Part(preset.llm["folder"], plan_conversion(load_rules(preset.llm["mapping"]), llm_state,
                                                                _shapes(model),
                                                                values={LORA_SCALE: lora["scale"]} if lora else {}),
                          llm_state)
    conversion = SalmConversion(source=source, preset=preset, config=config, llm=llm, llm_config=llm_config,
                                lora=lora, audio=audio, language_model=language_model)
    _plan_storage(conversion, options)
    return conversion


def _plan_storage(conversion: SalmConversion, options: Any) -> None:
    """Each part's stored tensors at the chosen dtype, quantized in mlx-lm's convention when asked."""
    from .convert import DTYPES

    for part in conversion.parts:
        if options.quantize is not None:
            part.quantization = plan_quantization(part.plan, options.quantize)
        part.stored = output_tensors(part.plan.tensors, part.sources(), DTYPES[options.dtype], part.quantization)
    if options.quantize is None:
        return
    audio, language_model = conversion.parts
    conversion.config = SpeechLLMConfig.from_dict({**conversion.config.to_dict(),
                                                   "quantization": audio.quantization.record(),
                                                   "quantization_config": audio.quantization.record()})
    record = language_model.quantization.record()
    conversion.llm_config = {**conversion.llm_config, "quantization": record, "quantization_config": record}
    for part, model in ((audio, _audio_model(conversion.config, audio.quantization.quantized)),
                        (language_model, _llm_model(conversion.llm_config, conversion.preset,
                                                    set(language_model.quantization.quantized)))):
        check_quantized_tree({tensor.key: tensor.shape for tensor in part.stored}, _shapes(model))


def _audio_model(config: SpeechLLMConfig, quantized: frozenset[str]) -> AudioEncoder:
    model = AudioEncoder(config)
    if config.quantization is not None:
        quantize_modules(model, config.quantization, {f"{path}.scales" for path in quantized})
    return model


def _write_tokenizer(llm: LlmSource, tag: str, folder: Path) -> None:
    """The LLM's tokenizer with SALM's audio placeholder added as SALM adds it (a special token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm.tokenizer_folder), use_fast=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [tag]})
    tokenizer.save_pretrained(str(folder))


def convert_salm(source: ResolvedSource, salm_config: dict[str, Any], out: Path, options: Any,
                 llm_source: str | None = None, reporter: Any = None, source_arg: str | None = None) -> SalmConversion:
    """Convert a SALM checkpoint folder into OUT, prove both halves, and publish OUT atomically."""
    from .convert import SilentReporter

    reporter = reporter or SilentReporter()
    source_arg = source_arg or str(source.path)
    files = weight_files(source.path)
    digest = SourceDigest(files[0])
    conversion = plan_salm(source, salm_config, options, llm_source, reporter.download_tqdm())
    with staged_output(out, options.force) as staging:
        for part in conversion.parts:
            target = staging / part.folder
            target.mkdir(parents=True, exist_ok=True)
            with reporter.task(f"write {part.folder or 'audio'}", sum(t.nbytes for t in part.stored),
                               len(part.stored)) as advance:
                part.files = write_weights(target, part.stored, TensorBytes(part.sources(), part.quantization),
                                           options.max_shard_bytes, lambda _key, nbytes: advance(nbytes))
        llm_folder = staging / conversion.language_model.folder
        write_json(llm_folder / CONFIG_FILE, conversion.llm_config)
        _write_tokenizer(conversion.llm, conversion.config.audio_locator_tag, llm_folder)
        write_json(staging / CONFIG_FILE, conversion.config.to_dict())
        with reporter.task("validate", 0, 1):
            conversion.validation, model = _validate(staging, conversion)
        with reporter.task("goldens", 0, 1):
            llm_goldens.write(staging / GOLDENS_FILE, llm_goldens.record(model))
        record = _record(conversion, options, digest.result())
        (staging / CARD_FILE).write_text(_card(conversion, record, out.name, options.command(source_arg, out.name),
                                               options.license, options.upload_repo))
        hashed = {f"{part.folder}/{name}" if part.folder else name: entry
                  for part in conversion.parts for name, entry in part.files.items()}
        conversion.manifest = build_manifest(staging, hashed)
        record["manifest"] = {name: entry.to_dict() for name, entry in conversion.manifest.items()}
        write_json(staging / CONVERSION_FILE, record)
    conversion.out = out
    return conversion


def _validate(folder: Path, conversion: SalmConversion) -> tuple[ValidationReport, SpeechLLM]:
    """The strict load (both halves, the LLM through mlx_lm.load) and each part's exact round trip."""
    from .model.load import load_model

    model = load_model(folder)
    assert isinstance(model, SpeechLLM)
    errors = []
    for part in conversion.parts:
        target = folder / part.folder
        files = [target / name for name in part.files]
        errors += check_round_trip(target, part.stored, part.sources(), part.quantization, files)
    parameters = len(tree_flatten(model.audio.parameters())) + len(tree_flatten(model.llm.parameters()))
    stored = sum(len(part.stored) for part in conversion.parts)
    return ValidationReport(parameters, stored, sorted(errors, key=lambda error: error.rel_l2, reverse=True)), model


def _record(conversion: SalmConversion, options: Any, sha256: str) -> dict[str, Any]:
    source = conversion.source.provenance()
    source["sha256"] = sha256
    audio, language_model = conversion.parts
    return {
        "converter": {"name": "canary-convert", "version": __version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "llm_source": conversion.llm.origin,
        "family": conversion.preset.name,
        "preset": conversion.preset.file,
        "mapping": {"name": audio.plan.mapping.name, "file": audio.plan.mapping.file,
                    "digest": audio.plan.mapping.digest},
        "llm_mapping": {"name": language_model.plan.mapping.name, "file": language_model.plan.mapping.file,
                        "digest": language_model.plan.mapping.digest, "folder": language_model.folder},
        "lora": conversion.lora and {**conversion.lora, "merged": [t.target_key for t in language_model.plan.merges()]},
        "base_model": conversion.source.repo_id or options.base_model,
        "options": options.to_dict(),
        "tensors": sum(len(part.plan.tensors) for part in conversion.parts),
        "parameter_count": sum(math.prod(t.target_shape) for part in conversion.parts for t in part.plan.tensors
                               if not t.target_key.startswith("preprocessor.")),
        "files": [f"{part.folder}/{name}" if part.folder else name for part in conversion.parts for name in part.files],
        "dropped": [{"key": d.key, "reason": d.reason} for part in conversion.parts for d in part.plan.dropped],
        "folded": len(language_model.plan.folded),
        "notes": [note for part in conversion.parts for note in part.plan.notes()],
        "validation": conversion.validation.to_dict() if conversion.validation else None,
    }


def _card(conversion: SalmConversion, record: dict[str, Any], folder: str, command: str, licence_flag: str | None,
          repo_id: str | None) -> str:
    import yaml

    source, preset = conversion.source, conversion.preset
    licence = choose_licence(licence_flag, source_card_licence(source), source.repo_id, preset.licenses)
    name = repo_id.split("/", 1)[1] if repo_id else folder
    llm = conversion.preset.llm
    title = record.get("base_model") or PurePath(source.path).name
    matter = {"library_name": "mlx", "license": licence.id, "language": ["en"],
              "pipeline_tag": "automatic-speech-recognition",
              "tags": ["mlx", "mlx-lm", "canary", "nemo", "speech-llm", "asr", preset.name]}
    if record.get("base_model"):
        matter["base_model"] = record["base_model"]
    lora = record.get("lora")
    body = [
        f"# {title} for MLX", "", preset.summary, "",
        f"Converted to [MLX](https://github.com/ml-explore/mlx) with canary-convert {__version__}, "
        f"{record['options']['dtype']}" + (f", {record['options']['quantize']['bits']}-bit" if record['options']['quantize'] else "") + ".", "",
        "## Use", "", "```sh", "pip install 'canary-convert[llm]'",
        *([f"hf download {repo_id} --local-dir {name}"] if repo_id else []),
        f"canary-transcribe speech.wav --model {name}", "```", "", "```python", "from canary_convert import load_model",
        "", f'model = load_model("{name}")', 'print(model.transcribe("speech.wav")[0].text)', "```", "",
        f"The LLM is an mlx-lm folder (`{conversion.language_model.folder}/`, the LoRA adapters merged, the tokenizer "
        f"with `{conversion.config.audio_locator_tag}`) that `mlx_lm.load()` reads as it is; long audio is "
        f"transcribed in windows of at most {conversion.config.generation.chunk_seconds:g} s (NeMo trained on up to "
        "40 s).", "",
        "## How it was made", "", *_provenance(record, command),
        f"- LLM mapping `{record['llm_mapping']['file']}` ({record['llm_mapping']['digest']})",
        f"- LoRA: r {lora['r']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])}: {lora['merge']}" if lora
        else "- no LoRA adapters", "",
        "## Validation", "",
        f"- strict load: the audio encoder and, through mlx_lm.load, the LLM ({record['validation']['parameters']} "
        "parameter arrays)",
        f"- round trip: each of the {record['validation']['tensors']} stored tensors equals its source (a merged "
        "weight: the float32 merge) at the stored dtype", "",
        "`goldens.json` holds this folder's audio embeddings, log-probs and greedy tokens on canary-convert's test "
        "signals; `canary-convert verify` checks the manifest, loads the folder and runs them again:", "",
        "```sh", f"canary-convert verify {repo_id or folder} --device cpu", "```", "",
        "## Licence", "", f"`{licence.id}`: {licence.origin}. {llm['licence_note']}", "",
    ]
    return f"---\n{yaml.safe_dump(matter, sort_keys=False)}---\n\n" + "\n".join(body)
