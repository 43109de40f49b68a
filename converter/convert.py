"""The conversion pipeline, one step per module: source -> archive -> preset + rules -> writer -> validate."""

from __future__ import annotations

import datetime as dt
import math
import shlex
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__
from .archive import (
    ALIGNER_CONFIG_MEMBER,
    ALIGNER_WEIGHTS_MEMBER,
    CONFIG_MEMBER,
    WEIGHTS_MEMBER,
    NemoArchive,
    open_archive,
)
from .card import CARD_FILE, CardFacts, choose_licence, render_card
from .errors import CanaryConvertError, MappingError, UsageError
from .goldens import GOLDENS_FILE, load_clips, record_goldens, write_goldens
from .manifest import CONVERSION_FILE, FileRecord, build_manifest
from .model.aed.canary import ALIGNER_FOLDER
from .model.load import CONFIG_FILE, model_class, parameter_shapes
from .model.quantized import QuantizeOptions
from .model.tokenizer import load_tokenizer
from .parity import ParityReport, require_nemo, run_parity
from .layouts import library_parameter_shapes
from .model.config import LayoutConfig
from .presets import OWN_LAYOUT, Derived, detect_preset, derive_config, foreign_paths
from .quantize import QuantizationPlan, check_quantized_tree, module_path, plan_quantization
from .rules import Plan, SumMerge, TensorPlan, load_rules, plan_conversion
from .convert_salm import SalmConversion, convert_salm, plan_salm
from .salm import read_salm_config
from .source import ResolvedSource, SourceDigest, resolve_source, source_card_licence
from .validate import ValidationReport, validate_folder
from .writer import (
    DEFAULT_MAX_SHARD_BYTES,
    OutputTensor,
    TensorBytes,
    output_tensors,
    staged_output,
    write_json,
    write_weights,
)

# The front end's window and mel filterbank are fixed tables, not learned parameters.
_FRONT_END = "preprocessor."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Reporter(Protocol):
    """Progress sink: the CLI renders it with rich; library callers may pass nothing."""

    def task(self, description: str, total_bytes: int, total_items: int) -> AbstractContextManager[Callable[[int], None]]:
        """A stage of work; the yielded callable is told the bytes of each finished item."""
        ...

    def download_tqdm(self) -> Any:
        """A tqdm class huggingface_hub can drive, or None for its own."""
        ...


class SilentReporter:
    @contextmanager
    def task(self, description: str, total_bytes: int, total_items: int) -> Iterator[Callable[[int], None]]:
        yield lambda nbytes: None

    def download_tqdm(self) -> Any:
        return None


@dataclass(frozen=True)
class ConvertOptions:
    dtype: str = "float32"
    revision: str | None = None
    force: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    parity: bool = False
    parity_audio: tuple[Path, ...] = ()
    quantize: QuantizeOptions | None = None
    license: str | None = None  # the model card's licence, when the source's own card cannot say
    base_model: str | None = None  # the Hub repo the source came from, when converting a local file
    upload_repo: str | None = None  # where the folder will be published (the card's usage shows it)
    layout: str = OWN_LAYOUT  # whose parameter names the folder uses (configs/aed-base.yaml, `layouts`)
    llm_source: str | None = None  # a speech-LLM's LLM config and tokenizer folder (else from the Hub cache)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.max_shard_bytes <= 0:
            raise UsageError("--max-shard-size must be positive")
        if self.parity_audio and not self.parity:
            raise UsageError("--parity-audio needs --parity")
        if self.llm_source is not None and not Path(self.llm_source).expanduser().is_dir():
            raise UsageError(f"--llm-source {self.llm_source}: no such folder")

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "revision": self.revision, "max_shard_bytes": self.max_shard_bytes,
                "parity": self.parity, "parity_audio": [str(path) for path in self.parity_audio],
                "quantize": self.quantize.to_dict() if self.quantize else None, "license": self.license,
                "base_model": self.base_model, "upload_repo": self.upload_repo, "layout": self.layout,
                "llm_source": self.llm_source}

    def command(self, source: str, out: str) -> str:
        """The `canary-convert` command line these options come from (for the model card)."""
        words = ["canary-convert", source, out]
        if self.revision:
            words += ["--revision", self.revision]
        if self.layout != OWN_LAYOUT:
            words += ["--layout", self.layout]
        if self.dtype != "float32":
            words += ["--dtype", self.dtype]
        if self.quantize:
            words += ["--quantize", str(self.quantize.bits), "--q-group-size", str(self.quantize.group_size)]
            words += ["--q-mode", self.quantize.mode] if self.quantize.mode != "affine" else []
        if self.max_shard_bytes != DEFAULT_MAX_SHARD_BYTES:
            words += ["--max-shard-size", str(self.max_shard_bytes)]
        if self.parity:
            words += ["--parity", *(word for path in self.parity_audio for word in ("--parity-audio", path.name))]
        if self.license:
            words += ["--license", self.license]
        if self.base_model:
            words += ["--base-model", self.base_model]
        if self.upload_repo:
            words += ["--upload-repo", self.upload_repo]
        if self.llm_source:
            words += ["--llm-source", Path(self.llm_source).name]
        return shlex.join(words)


@dataclass
class Conversion:
    """What a run found and did; `plan` is complete before anything is written."""

    source: ResolvedSource
    derived: Derived
    plan: Plan
    stored: list[OutputTensor]  # what the weight files hold, in order
    ignored_members: list[str]
    quantization: QuantizationPlan | None = None
    out: Path | None = None
    files: list[str] = field(default_factory=list)  # the weight files
    manifest: dict[str, FileRecord] = field(default_factory=dict)  # every file of OUT but conversion.json
    validation: ValidationReport | None = None
    parity: ParityReport | None = None
    aligner: ModelPart | None = None  # canary-1b-v2's timestamp aligner, written into OUT/aligner/


@dataclass
class ModelPart:
    """A second model written into a subfolder of OUT beside the main one, through the same pipeline:
    canary-1b-v2's CTC timestamp aligner (`aligner/`), read from its own archive members."""

    folder: str
    derived: Derived
    plan: Plan
    stored: list[OutputTensor]
    quantization: QuantizationPlan | None = None
    files: list[str] = field(default_factory=list)
    validation: ValidationReport | None = None


def _ignored_members(archive: NemoArchive, used: set[str]) -> list[str]:
    """Members the conversion does not need (unused vocab files)."""
    return sorted(set(archive.members) - used - {CONFIG_MEMBER, WEIGHTS_MEMBER})


def _plan_model(nemo_config: dict[str, Any], state_dict: dict[str, torch.Tensor], archive: NemoArchive,
                options: ConvertOptions, layout_name: str = OWN_LAYOUT
                ) -> tuple[Derived, Plan, list[OutputTensor], QuantizationPlan | None]:
    """One model's plan: its preset and config.json, the mapping proven against the bundled model (and the
    layout's library), what is stored and what is quantized."""
    preset = detect_preset(nemo_config)
    layout = preset.layout(layout_name, nemo_config)
    if layout is not None and options.quantize is not None and layout.quantize_refused:
        raise UsageError(f"--layout {layout.name} --quantize: {layout.quantize_refused}; convert in float (--dtype) "
                         "for that library, or quantize in canary-convert's own layout")
    derived = derive_config(preset, nemo_config, state_dict, archive.artifacts(nemo_config), layout,
                           set(archive.members))
    if options.parity and not model_class(derived.config.model_type).nemo_parity:
        raise UsageError(f"{preset.name}: --parity compares Canary models with NeMo at conversion; for this family "
                         "the tests compare it with NeMo (tests/test_ctc.py), and goldens.json records its outputs")
    own_shapes = parameter_shapes(derived.config)
    # The bundled model's own plan proves it is filled, whichever library's names the folder is written in.
    own = plan_conversion(load_rules(preset.mapping), state_dict, own_shapes)
    plan = own
    if layout is not None:
        library = library_parameter_shapes(layout.name, derived.config_json())
        plan = plan_conversion(load_rules(layout.mapping), state_dict, library, side_expected=own_shapes)
    quantization = None
    if options.quantize is not None:
        quantization = plan_quantization(plan, options.quantize)
        record = quantization.record()
        derived = replace(derived, config=replace(derived.config, quantization=record, quantization_config=record))
    stored = output_tensors(plan.tensors, plan.sources(state_dict), DTYPES[options.dtype], quantization)
    if quantization is not None:
        in_weight_files = {tensor.key: tensor.shape for tensor in stored if not tensor.plan.rule.file}
        check_quantized_tree(in_weight_files, library_parameter_shapes(layout.name, derived.config_json(),
                                                                       quantization.quantized)
                             if layout is not None else parameter_shapes(derived.config, quantization.quantized))
    if layout is not None:
        derived = replace(derived, config=replace(derived.config, layout=_layout_record(derived, own, stored)))
    return derived, plan, stored, quantization


def _plan(archive: NemoArchive, source: ResolvedSource, state_dict: dict[str, torch.Tensor],
          options: ConvertOptions, aligner_state: dict[str, torch.Tensor] | None = None) -> Conversion:
    derived, plan, stored, quantization = _plan_model(archive.config(), state_dict, archive, options, options.layout)
    used = set(derived.tokenizer_files.values())
    aligner = None
    if aligner_state is not None:
        # The aligner keeps canary-convert's own names whatever --layout says: mlx-audio ignores it.
        try:
            part = _plan_model(archive.config(ALIGNER_CONFIG_MEMBER), aligner_state, archive, options)
        except CanaryConvertError as exc:  # the same error, saying it is the aligner's
            raise type(exc)(f"the timestamp aligner ({ALIGNER_CONFIG_MEMBER}): {exc}") from None
        aligner = ModelPart(ALIGNER_FOLDER, *part)
        used |= set(aligner.derived.tokenizer_files.values()) | {ALIGNER_CONFIG_MEMBER, ALIGNER_WEIGHTS_MEMBER}
    return Conversion(source=source, derived=derived, plan=plan, stored=stored,
                      ignored_members=_ignored_members(archive, used), quantization=quantization, aligner=aligner)


def _layout_record(derived: Derived, own: Plan, stored: list[OutputTensor]) -> LayoutConfig:
    """How the bundled model reads a folder in another library's names: each stored tensor's name in the
    bundled model, found by sending the same NeMo key through its own mapping (None: a tied copy it drops)."""
    assert derived.layout is not None
    bundled = {tensor.source_key: tensor.target_key for tensor in own.tensors}
    own_plans = {tensor.source_key: tensor for tensor in own.tensors}
    rename: dict[str, str | None] = {}
    added: dict[str, str] = {}
    reshape: dict[str, list[int]] = {}
    for tensor in stored:
        name = bundled.get(tensor.plan.source_key)
        rename[tensor.key] = name if name is None or tensor.part is None else f"{module_path(name)}.{tensor.part}"
        mine = own_plans.get(tensor.plan.source_key)
        if name is not None and tensor.part is None and mine is not None and mine.target_shape != tensor.shape:
            reshape[name] = list(_same_order(tensor.plan, mine))
        # A stored sum (SumMerge) stands in for both of the bundled model's tensors: the twin reads as zeros.
        if isinstance(tensor.plan.merge, SumMerge) and name is not None:
            added[bundled[tensor.plan.merge.twin_key]] = name
    ours = derived.config.to_dict()
    return LayoutConfig(name=derived.layout.name, mapping=derived.layout.mapping,
                        foreign_keys=sorted(foreign_paths(ours, derived.foreign)),
                        side_files=sorted({tensor.plan.rule.file for tensor in stored if tensor.plan.rule.file}),
                        rename=rename, added=added, reshape=reshape)


def _same_order(library: TensorPlan, own: TensorPlan) -> tuple[int, ...]:
    """The bundled model's shape for a tensor stored in the library's shape, when a reshape is all that differs
    (a kernel-1 Conv1d as parakeet-mlx keeps it, squeezed to a Linear weight by ours); else a MappingError."""
    probe = torch.arange(math.prod(library.source_shape), dtype=torch.float64).reshape(library.source_shape)
    theirs, mine = library.convert(probe, torch.float64), own.convert(probe, torch.float64)
    if not torch.equal(theirs.flatten(), mine.flatten()):
        raise MappingError(f"{library.source_key}: stored as {library.target_key} {library.target_shape}, which no "
                           f"reshape turns into the bundled model's {own.target_key} {own.target_shape}")
    return own.target_shape


@dataclass
class _Opened:
    archive: NemoArchive
    source: ResolvedSource
    state_dict: dict[str, torch.Tensor]
    aligner_state: dict[str, torch.Tensor] | None  # the aligner's weights, when the archive carries one


@contextmanager
def _opened(source_arg: str, options: ConvertOptions, reporter: Reporter) -> Iterator[_Opened]:
    source = resolve_source(source_arg, options.revision, tqdm_class=reporter.download_tqdm())
    with open_archive(source.path) as archive, ExitStack() as stack:
        members = [WEIGHTS_MEMBER] + ([ALIGNER_WEIGHTS_MEMBER] if archive.has_aligner else [])
        with reporter.task("read", sum(archive.members[member] for member in members), len(members)) as advance:
            states = [stack.enter_context(archive.state_dict(on_bytes=advance, member=member)) for member in members]
        yield _Opened(archive, source, states[0], states[1] if len(states) > 1 else None)


def _speech_llm(source_arg: str, options: ConvertOptions, reporter: Reporter) -> tuple[ResolvedSource, dict[str, Any]] | None:
    """A SALM checkpoint folder (canary-qwen) and its config, or None for a .nemo source."""
    source = resolve_source(source_arg, options.revision, tqdm_class=reporter.download_tqdm())
    config = read_salm_config(source.path) if source.path.is_dir() else None
    if config is None:
        return None
    if options.layout != OWN_LAYOUT or options.parity:
        raise UsageError("a speech-LLM converts in canary-convert's own layout, without --parity (its tests compare "
                         "it with NeMo)")
    return source, config


def plan_only(source_arg: str, options: ConvertOptions, reporter: Reporter | None = None) -> Conversion | SalmConversion:
    """Everything but writing: the `--dry-run` plan, with every coverage check already done."""
    if (salm := _speech_llm(source_arg, options, reporter or SilentReporter())) is not None:
        return plan_salm(*salm, options, options.llm_source)
    with _opened(source_arg, options, reporter or SilentReporter()) as opened:
        return _plan(opened.archive, opened.source, opened.state_dict, options, opened.aligner_state)


def convert(source_arg: str, out: Path, options: ConvertOptions,
            reporter: Reporter | None = None) -> Conversion | SalmConversion:
    """Convert SOURCE into the MLX folder OUT, validate it, and publish it atomically."""
    reporter = reporter or SilentReporter()
    if (salm := _speech_llm(source_arg, options, reporter)) is not None:
        return convert_salm(*salm, out, options, options.llm_source, reporter, source_arg)
    if options.parity:
        require_nemo()
    with _opened(source_arg, options, reporter) as opened:
        archive, source, state_dict = opened.archive, opened.source, opened.state_dict
        # A folder has no archive to hash; its weights file identifies it.
        digest = SourceDigest(source.path / WEIGHTS_MEMBER if source.kind == "folder" else source.path)
        conversion = _plan(archive, source, state_dict, options, opened.aligner_state)
        stored = conversion.stored
        with staged_output(out, options.force) as staging:
            sources = conversion.plan.sources(state_dict)  # merged tensors (a summed bias) as stored
            hashed = _write_model(archive, staging, conversion.derived, stored,
                                  TensorBytes(sources, conversion.quantization), options, reporter)
            conversion.files = list(hashed)
            aligner = conversion.aligner
            aligner_sources = None
            if aligner is not None:
                assert opened.aligner_state is not None
                aligner_sources = aligner.plan.sources(opened.aligner_state)
                part = _write_model(archive, staging / aligner.folder, aligner.derived, aligner.stored,
                                    TensorBytes(aligner_sources, aligner.quantization), options, reporter)
                aligner.files = [f"{aligner.folder}/{name}" for name in part]
                hashed |= {f"{aligner.folder}/{name}": record for name, record in part.items()}
            with reporter.task("validate", 0, 1):
                if aligner is not None:
                    assert aligner_sources is not None
                    aligner.validation, _ = validate_folder(staging / aligner.folder, aligner.stored,
                                                            aligner_sources, aligner.quantization)
                conversion.validation, model = validate_folder(staging, stored, sources, conversion.quantization)
            if options.parity:
                conversion.parity = run_parity(source.path, model, options.parity_audio)
            clips = load_clips(options.parity_audio, model.config.preprocessor.sample_rate)
            with reporter.task("goldens", 0, 1):
                write_goldens(staging / GOLDENS_FILE, record_goldens(model, clips, conversion.parity, folder=staging))
            record = _provenance(conversion, options, digest.result())
            (staging / CARD_FILE).write_text(_card(conversion, options, record, staging, source_arg, out.name))
            conversion.manifest = build_manifest(staging, hashed)
            record["manifest"] = {name: entry.to_dict() for name, entry in conversion.manifest.items()}
            write_json(staging / CONVERSION_FILE, record)
        conversion.out = out
        return conversion


def _write_model(archive: NemoArchive, folder: Path, derived: Derived, stored: list[OutputTensor],
                 tensor_bytes: TensorBytes, options: ConvertOptions, reporter: Reporter) -> dict[str, FileRecord]:
    """One model's weight files, tokenizer files and config.json into `folder`; the weight files' records."""
    folder.mkdir(parents=True, exist_ok=True)
    with reporter.task("write", sum(t.nbytes for t in stored), len(stored)) as advance:
        hashed = write_weights(folder, stored, tensor_bytes, options.max_shard_bytes,
                               lambda _key, nbytes: advance(nbytes))
    for relative, member in derived.tokenizer_files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        archive.copy_member(member, folder / relative)
    write_json(folder / CONFIG_FILE, derived.config_json())
    return hashed


def _card(conversion: Conversion, options: ConvertOptions, record: dict[str, Any], staging: Path, source_arg: str,
          folder: str) -> str:
    source, preset = conversion.source, conversion.derived.preset
    licence = choose_licence(options.license, source_card_licence(source), source.repo_id, preset.licenses)
    config = conversion.derived.config
    languages = load_tokenizer(staging, config.tokenizer).languages
    return render_card(CardFacts(record=record, config=config.to_dict(), folder=folder, summary=preset.summary,
                                 languages=languages, licence=licence, command=options.command(source_arg, folder),
                                 repo_id=options.upload_repo, parity=conversion.parity))


def _provenance(conversion: Conversion, options: ConvertOptions, sha256: str) -> dict[str, Any]:
    source = conversion.source
    record = source.provenance()
    record["sha256"] = sha256
    return {
        "converter": {"name": "canary-convert", "version": __version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": record,
        "base_model": source.repo_id or options.base_model,
        "options": options.to_dict(),
        **_model_record(conversion.derived, conversion.plan, conversion.files),
        "ignored_members": conversion.ignored_members,
        "validation": conversion.validation.to_dict() if conversion.validation else None,
        "parity": conversion.parity.to_dict() if conversion.parity else None,
        **({"aligner": _part_record(conversion.aligner)} if conversion.aligner is not None else {}),
    }


def _model_record(derived: Derived, plan: Plan, files: list[str]) -> dict[str, Any]:
    """What conversion.json says of one model: its family, preset, mapping, tensors and files."""
    return {
        "family": derived.preset.name,
        "preset": derived.preset.file,
        "mapping": {"name": plan.mapping.name, "file": plan.mapping.file, "digest": plan.mapping.digest},
        "tensors": len(plan.tensors),
        "parameter_count": sum(math.prod(t.target_shape) for t in plan.tensors
                               if not t.target_key.startswith(_FRONT_END)),
        "files": files,
        "dropped": [{"key": d.key, "reason": d.reason} for d in plan.dropped],
        "notes": plan.notes(),
    }


def _part_record(part: ModelPart) -> dict[str, Any]:
    """conversion.json's record of a model written beside the main one (canary-1b-v2's aligner)."""
    return {
        "folder": part.folder,
        "members": [ALIGNER_CONFIG_MEMBER, ALIGNER_WEIGHTS_MEMBER],
        **_model_record(part.derived, part.plan, part.files),
        "validation": part.validation.to_dict() if part.validation else None,
    }
