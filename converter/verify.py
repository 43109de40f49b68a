"""The verifier: check a converted folder from the folder alone — its manifest, a strict load, and its
golden outputs (and NeMo's reference, when the conversion recorded one) — or compare two folders.

Each check is one line of the report; `--json` writes the report in a versioned schema and `--junit-xml`
one test case per check, so CI systems show them. Exit codes: 0 pass, 3 regression, 1 error.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree

import mlx.core as mx
import numpy as np

from . import __version__, llm_goldens
from .errors import EXIT_ERROR, EXIT_OK, EXIT_VALIDATION, ModelFolderError, UsageError
from .goldens import (
    GOLDENS_FILE,
    MAX_NEW_TOKENS,
    STAGES,
    GoldensError,
    Tolerances,
    fingerprint,
    first_difference,
    GroupRun,
    decode_all,
    head_decodings,
    gaps,
    golden_modes,
    golden_prompts,
    goldens_digest,
    load_clips,
    read_goldens,
    record_goldens,
    run_group,
    write_goldens,
    same_up_to_cap,
    signals_digest,
    stage_distance,
)
from .untrusted import finite_number, folder_file, read_json
from .manifest import CONVERSION_FILE, NOT_CONVERTED, hash_file, manifest_problems, read_record, recorded_manifest
from .model.aed.canary import CanaryModel
from .model.speech import SpeechModel
from .model.llm.speechllm import SpeechLLM
from .model.aed.decoding import DecodingOptions
from .model.load import CONFIG_FILE, INDEX_FILE, files_read, load_model, read_config, read_tensors, weight_files
from .model.aed.prompts import PromptOptions
from .model.quantized import read_quantization
from .model.cpu.streaming import layers_streamed
from .parity import reference_signals

REPORT_SCHEMA = "canary-convert/verify-report"
REPORT_VERSION = 1
# The JSON Schema of `to_json`, shipped in the package (canary_convert/schemas/).
REPORT_SCHEMA_FILE = "verify-report-v1.schema.json"
# The command-line option of each tolerance (cli.py), for messages.
TOLERANCE_OPTIONS = {"features_max_abs": "tol-features", "encoder_rel_l2": "tol-encoder",
                     "logprobs_max_abs": "tol-logprobs", "near_tie": "near-tie"}
Status = Literal["pass", "fail", "advisory", "skipped", "error"]


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, and where (file, stage) when it failed."""

    name: str
    status: Status
    detail: str
    file: str | None = None
    stage: str | None = None


@dataclass
class VerifyReport:
    target: str
    device: str
    checks: list[Check] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        statuses = {check.status for check in self.checks}
        return EXIT_ERROR if "error" in statuses else EXIT_VALIDATION if "fail" in statuses else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """The report in its versioned schema (README: "verify --json")."""
        return {"schema": REPORT_SCHEMA, "version": REPORT_VERSION, "target": self.target,
                "canary_convert": __version__, "mlx": mx.__version__, "platform": platform.platform(),
                "device": self.device, "passed": self.exit_code == EXIT_OK,
                "checks": [asdict(check) for check in self.checks]}

    def to_junit(self) -> bytes:
        """JUnit XML: one test case per check (failure, error or skipped; advisories pass with a note)."""
        counts = {status: sum(c.status == status for c in self.checks) for status in ("fail", "error", "skipped")}
        suite = ElementTree.Element("testsuite", name=f"canary-convert verify {self.target}",
                                    tests=str(len(self.checks)), failures=str(counts["fail"]),
                                    errors=str(counts["error"]), skipped=str(counts["skipped"]))
        properties = ElementTree.SubElement(suite, "properties")
        for name, value in (("device", self.device), ("mlx", mx.__version__), ("platform", platform.platform()),
                            ("canary_convert", __version__)):
            ElementTree.SubElement(properties, "property", name=name, value=value)
        for check in self.checks:
            case = ElementTree.SubElement(suite, "testcase", classname=check.stage or "folder", name=check.name)
            if check.status in ("fail", "error", "skipped"):
                tag = {"fail": "failure", "error": "error", "skipped": "skipped"}[check.status]
                ElementTree.SubElement(case, tag, message=check.detail)
            elif check.status == "advisory":
                ElementTree.SubElement(case, "system-out").text = f"advisory: {check.detail}"
        return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)


def use_device(device: str) -> None:
    """CPU gives the same numbers on any machine; the GPU is Apple silicon's (Metal) backend."""
    if device not in ("cpu", "gpu"):
        raise UsageError(f"--device {device!r}: choose cpu or gpu")
    target = mx.gpu if device == "gpu" else mx.cpu
    if not mx.is_available(target):
        raise UsageError(f"--device {device}: this MLX build ({mx.__version__}, {platform.system()}) has no {device}")
    mx.set_default_device(target)


def check_manifest(folder: Path, record: dict[str, Any], repo_files: Collection[str] | None = None) -> Check:
    """Every file of the folder as the manifest records it, and every file the model reads among them (a
    name outside the manifest, such as one under .cache/, is read unchecked otherwise). For a Hub repo,
    `repo_files` lists the repo's files: the folder holds only what was fetched, so the added ones are named
    from the listing."""
    try:
        manifest = recorded_manifest(folder, record)
    except ModelFolderError as exc:
        return Check("manifest", "error", str(exc), CONVERSION_FILE)
    problems = manifest_problems(folder, manifest, added=repo_files is None)
    if repo_files is not None:
        problems += [f"{name}: in the repo but not in the manifest (added after the conversion)"
                     for name in sorted(set(repo_files) - set(manifest) - {CONVERSION_FILE, *NOT_CONVERTED})]
    try:
        config = read_config(folder_file(folder, CONFIG_FILE))
        read = [path.relative_to(folder).as_posix() for path in files_read(folder, config)]
    except (ModelFolderError, ValueError, KeyError, TypeError):
        read = []  # the strict load says why
    problems += [f"{name}: read by the model but not in the manifest" for name in read if name not in manifest]
    if problems:
        return Check("manifest", "fail", "; ".join(problems), problems[0].split(":", 1)[0])
    return Check("manifest", "pass", f"{len(manifest)} files, sizes and sha256 as recorded")


def check_load(folder: Path) -> tuple[Check, SpeechModel | None]:
    try:
        model = load_model(folder)
    except ModelFolderError as exc:
        return Check("strict load", "fail", str(exc), _named_file(str(exc), folder)), None
    kind = "quantized " if model.config.quantization else ""
    return Check("strict load", "pass", f"every parameter of the {kind}model present with its shape"), model


def _named_file(message: str, folder: Path) -> str | None:
    """The folder's file a load error names, so the report points at it."""
    try:
        weights = [file.name for file in weight_files(folder)]
    except ModelFolderError:
        weights = []
    for name in ("config.json", INDEX_FILE, *weights, "tokenizer"):
        if name in message:
            return name
    return None


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, Mapping):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key is X, was Y` for every config.json entry that differs."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key} is {after.get(key)!r}, was {before.get(key)!r}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def check_config(goldens: Mapping[str, Any], model: SpeechModel) -> Check:
    changed = config_differences(goldens["config"], model.config.to_dict())
    if changed:
        return Check("config", "fail", "config.json: " + "; ".join(changed) + " (when the goldens were recorded)",
                     "config.json", "config")
    return Check("config", "pass", "config.json as when the goldens were recorded")


def _group_signals(name: str, group: Mapping[str, Any], model: SpeechModel,
                   clips: Sequence[tuple[str, np.ndarray, str]]) -> list[np.ndarray] | str:
    """The group's signals, or why they are not at hand."""
    sample_rate = model.config.preprocessor.sample_rate
    if name == "test-signals":
        signals = reference_signals(sample_rate)
        if signals_digest(signals) != group["signals"]["sha256"]:
            return "the synthesised test signals differ from the recorded ones (a different numpy?)"
        return signals
    given = {digest: samples for _, samples, digest in clips}
    wanted = group["clips"]
    if missing := [clip["name"] for clip in wanted if clip["sha256"] not in given]:
        return f"clips {', '.join(missing)} not given (pass them with --audio; matched by sha256)"
    return [given[clip["sha256"]] for clip in wanted]


def check_stages(group_name: str, golden: Mapping[str, Any], now: Mapping[str, Any], tolerances: Tolerances,
                 label: str = "") -> list[Check]:
    checks = []
    for stage in STAGES:
        distance = stage_distance(stage, golden[stage], now[stage])
        limit = tolerances.limit(stage)
        measure = "relative L2" if stage == "encoder" else "max |Δ|"
        status: Status = "pass" if distance <= limit else "fail"
        checks.append(Check(f"{group_name}: {label}{stage}", status, f"{measure} {distance:.2e} (limit {limit:g})",
                            stage=stage))
    return checks


def _describe(prompt: Mapping[str, Any] | None, mode: str) -> str:
    if prompt is None:
        return mode
    target = prompt.get("target_lang") or prompt["source_lang"]
    return f"{prompt['task']} {prompt['source_lang']}->{target} {mode}"


def golden_options(golden: Mapping[str, Any], model: CanaryModel) -> tuple[PromptOptions, DecodingOptions]:
    """The prompt and decoding options a golden record was made with."""
    options = replace(golden_modes(model)["greedy"], strategy=golden["strategy"], beam_size=golden["beam_size"],
                      length_penalty=golden["length_penalty"])
    prompt = PromptOptions(**golden["prompt"])
    if prompt not in golden_prompts(model):  # the folder's goldens choose nothing the tool would not record
        raise GoldensError(f"{GOLDENS_FILE}: prompt {golden['prompt']} is not one canary-convert records for this model")
    return prompt, options


def check_decoding(group_name: str, golden: Mapping[str, Any], now: list[list[int]], model: SpeechModel,
                   run: GroupRun, tolerances: Tolerances) -> Check:
    """One golden prompt and mode against this run's tokens `now`; a first difference at a recorded near-tie
    is advisory."""
    name = f"{group_name}: {_describe(golden['prompt'], golden['mode'])} tokens"
    if golden["prompt"] is None:
        # A head without prompts records no near-tie gaps: its tokens must be the same.
        differing = [row for row, (old, new) in enumerate(zip(golden["tokens"], now)) if old != new]
        if differing:
            row = differing[0]
            at = first_difference(golden["tokens"][row], now[row])
            return Check(name, "fail", f"utterance {row}, token {at}: {golden['tokens'][row][at:at + 3]} -> "
                         f"{now[row][at:at + 3]}", stage="decoding")
        return Check(name, "pass", f"{len(now)} utterances identical")
    prompt = PromptOptions(**golden["prompt"])
    advisories = []
    current_gaps: list[list[float]] = []
    if len(golden["tokens"]) != len(now):
        return Check(name, "fail", f"{len(now)} utterances decoded, the goldens record {len(golden['tokens'])}",
                     stage="decoding")
    for row, (old, new) in enumerate(zip(golden["tokens"], now)):
        at = first_difference(old, new)
        if at is None:
            continue
        current_gaps = current_gaps or gaps(model, run, [(prompt, now)])[0]
        recorded = golden["gaps"][row] + [float("inf")]
        current = current_gaps[row] + [float("inf")]
        gap = min(recorded[min(at, len(recorded) - 1)], current[min(at, len(current) - 1)])
        where = f"utterance {row}, token {at}: {old[at:at + 3]} -> {new[at:at + 3]}"
        if gap >= tolerances.near_tie:
            return Check(name, "fail", f"{where} (top-2 gap {gap:.2e}, not a near-tie)", stage="decoding")
        advisories.append(f"{where} at a near-tie (gap {gap:.2e} < {tolerances.near_tie:g})")
    if advisories:
        return Check(name, "advisory", "; ".join(advisories), stage="decoding")
    return Check(name, "pass", f"{len(now)} utterances identical")


def check_reference(group_name: str, group: Mapping[str, Any], now: Mapping[str, Any], model: SpeechModel,
                    greedy_now: list[list[int]] | None) -> list[Check]:
    """Against NeMo's own outputs recorded at conversion, within the parity limits of the precision;
    `greedy_now` is this run's greedy transcription in the first language (NeMo's reference prompt)."""
    from .parity import precision_of

    assert model.tokenizer is not None
    reference = group["reference"]
    _, limits = precision_of(model)
    checks = []
    for stage, limit in (("features", limits.features_max_abs), ("encoder", limits.encoder_rel_l2),
                         ("logprobs", limits.logprobs_max_abs)):
        distance = stage_distance(stage, reference["stages"][stage], now[stage])
        name = f"{group_name}: NeMo reference, {stage}"
        if limit is None:
            checks.append(Check(name, "skipped", f"no parity limit at this precision; measured {distance:.2e}",
                                stage=stage))
            continue
        checks.append(Check(name, "pass" if distance <= limit else "fail", f"{distance:.2e} (parity limit {limit:g})",
                            stage=stage))
    nemo_greedy = reference["tokens"].get("greedy")
    if nemo_greedy and greedy_now is not None:
        same = all(same_up_to_cap(MAX_NEW_TOKENS, ref, mine, model.tokenizer.eos_id, model.tokenizer.pad_id)
                   for ref, mine in zip(nemo_greedy, greedy_now))
        checks.append(Check(f"{group_name}: NeMo reference, greedy tokens", "pass" if same else "fail",
                            f"first {MAX_NEW_TOKENS} tokens {'identical to' if same else 'differ from'} NeMo's",
                            stage="decoding"))
    return checks


def verify_goldens(goldens: Mapping[str, Any], model: SpeechModel, tolerances: Tolerances,
                   clips: Sequence[tuple[str, np.ndarray, str]] = (), folder: Path | None = None) -> list[Check]:
    assert model.tokenizer is not None
    checks = [check_config(goldens, model)]
    # NeMo's reference transcribed in the first language with punctuation: the golden prompt of that name
    # (a head without prompts records its modes with no prompt).
    reference_prompt = asdict(PromptOptions(model.tokenizer.languages[0])) if isinstance(model, CanaryModel) else None
    # With the folder, each layer holds its weights only while it runs (streaming.py).
    with layers_streamed(model, folder):
        for group_name, group in goldens["groups"].items():
            signals = _group_signals(group_name, group, model, clips)
            if isinstance(signals, str):
                checks.append(Check(f"{group_name}: stages and tokens", "skipped", signals))
                continue
            run = run_group(model, signals)
            now = {stage: fingerprint(run.stages, stage, [row["positions"] for row in group["stages"][stage]])
                   for stage in STAGES}
            checks += check_stages(group_name, group["stages"], now, tolerances)
            greedy_now = None
            decoded = _decode_recorded(model, run, group["decoding"])
            for golden, tokens in zip(group["decoding"], decoded):
                checks.append(check_decoding(group_name, golden, tokens, model, run, tolerances))
                if golden["mode"] == "greedy" and golden["prompt"] == reference_prompt:
                    greedy_now = tokens
            if "reference" in group:
                checks += check_reference(group_name, group, now, model, greedy_now)
    # The models the folder carries in subfolders (canary-1b-v2's aligner), each against its own goldens.
    attached = model.attached()
    recorded_parts = goldens.get("parts", {})
    # A model the folder loads is checked or the folder fails: goldens without its part check nothing of it.
    checks += [Check(f"{name}: goldens", "fail", f"the folder loads {name}/, for which the goldens record nothing",
                     GOLDENS_FILE) for name in attached if name not in recorded_parts]
    for name, part_goldens in recorded_parts.items():
        if name not in attached:
            checks.append(Check(f"{name}: load", "fail", f"the goldens hold {name}/, which the folder does not load",
                                name))
            continue
        part_checks = verify_goldens(part_goldens, attached[name], tolerances, clips,
                                     folder / name if folder is not None else None)
        checks += [replace(check, name=f"{name}: {check.name}", file=f"{name}/{check.file}" if check.file else name)
                   for check in part_checks]
    return checks


def tolerances_of(goldens: Mapping[str, Any], overrides: Mapping[str, float | None], dtype: str) -> Tolerances:
    """This tool's tolerances for the weights' dtype, tightened by any the goldens record (the folder under
    test may ask for more, never less), then any the command line sets, which have the last word."""
    for key, value in overrides.items():
        if value is not None and not (finite_number(value) and value >= 0):
            raise UsageError(f"--{TOLERANCE_OPTIONS[key]} {value}: a tolerance is a finite number >= 0")
    tolerances = Tolerances.for_dtype(dtype).tightened(goldens["tolerances"])
    return replace(tolerances, **{key: value for key, value in overrides.items() if value is not None})


def _decode_recorded(model: SpeechModel, run: GroupRun, recorded: Sequence[Mapping[str, Any]]) -> list[list[list[int]]]:
    """This run's tokens for each recorded golden: a prompt and mode (Canary), or a head's mode alone."""
    if not isinstance(model, CanaryModel):
        return head_decodings(model, run, [golden["mode"] for golden in recorded])
    return decode_all(model, run, [golden_options(golden, model) for golden in recorded])


def verify_folder(folder: Path, target: str, device: str, goldens_path: Path | None = None,
                  overrides: Mapping[str, float | None] | None = None, audio: Sequence[Path] = (),
                  repo_files: Collection[str] | None = None) -> VerifyReport:
    """Manifest, strict load, then the golden outputs (and NeMo's reference when recorded); `repo_files`: a
    Hub repo's files, when `folder` is what was fetched of it (source.repo_files)."""
    use_device(device)
    report = VerifyReport(target=target, device=device)
    record = read_record(folder)
    report.checks.append(check_manifest(folder, record, repo_files))
    load, model = check_load(folder)
    report.checks.append(load)
    path = goldens_path or folder / GOLDENS_FILE
    if isinstance(model, SpeechLLM):
        report.checks.append(_speech_llm_goldens(path, model))
        return report
    try:
        goldens = read_goldens(path)
    except GoldensError as exc:
        report.checks.append(Check("goldens", "error", str(exc), path.name))
        return report
    if model is None:
        report.checks.append(Check("goldens", "skipped", "the folder does not load"))
        return report
    tolerances = tolerances_of(goldens, overrides or {}, str(model.compute_dtype).removeprefix("mlx.core."))
    clips = load_clips(audio, model.config.preprocessor.sample_rate)
    report.checks += verify_goldens(goldens, model, tolerances, clips, folder)
    return report


def _speech_llm_goldens(path: Path, model: SpeechLLM) -> Check:
    """A speech-LLM folder's goldens (llm_goldens.py): its own schema, run again."""
    try:
        goldens = read_json(path, GoldensError)
    except GoldensError as exc:
        return Check("goldens", "error", str(exc), path.name)
    if not llm_goldens.is_speech_llm_goldens(goldens):
        return Check("goldens", "error", f"{path}: not a speech-LLM golden file", path.name)
    failures, advisories = llm_goldens.problems(goldens, model)
    if failures:
        return Check("goldens", "fail", "; ".join(failures), path.name)
    if advisories:
        return Check("goldens", "advisory", "; ".join(advisories), path.name)
    signals = len(goldens["signals"])
    return Check("goldens", "pass", f"audio embeddings, log-probs and greedy tokens of {signals} test signals as recorded")


# --- verify --update ----------------------------------------------------------------------------------------


def update_goldens(folder: Path, device: str, audio: Sequence[Path] = ()) -> list[str]:
    """Record the folder's goldens again with this MLX and canary-convert; keep NeMo's reference; re-hash the
    manifest entry. Returns what changed."""
    use_device(device)
    record = read_record(folder)
    model = load_model(folder)
    path = folder / GOLDENS_FILE
    old = read_goldens(path) if path.is_file() else None
    new = record_goldens(model, load_clips(audio, model.config.preprocessor.sample_rate), device=device, folder=folder)
    if old is not None:
        for name, group in old["groups"].items():
            if "reference" in group and name in new["groups"]:
                new["groups"][name]["reference"] = group["reference"]
        new["digest"] = goldens_digest(new)
    changes = (golden_changes(old, new) or ["nothing changed"]) if old is not None else ["no goldens before: recorded anew"]
    partial = path.with_name(f".{path.name}.partial")
    write_goldens(partial, new)
    os.replace(partial, path)
    record.setdefault("manifest", {})[GOLDENS_FILE] = hash_file(path).to_dict()
    _replace_file(folder / CONVERSION_FILE, json.dumps(record, indent=2) + "\n")
    return changes


def golden_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two golden files: versions, config, stage distances, token ids."""
    changes = [f"made by {key} {old['made_by'].get(key)} -> {new['made_by'].get(key)}"
               for key in ("canary_convert", "mlx", "device") if old["made_by"].get(key) != new["made_by"].get(key)]
    changes += [f"config: {line}" for line in config_differences(old["config"], new["config"])]
    for name, group in new["groups"].items():
        before = old["groups"].get(name)
        if before is None:
            changes.append(f"{name}: new group")
            continue
        for stage in STAGES:
            distance = stage_distance(stage, before["stages"][stage], group["stages"][stage])
            if distance:
                changes.append(f"{name}: {stage} moved by {distance:.2e}")
        previous = {(json.dumps(d["prompt"], sort_keys=True), d["mode"]): d["tokens"] for d in before["decoding"]}
        for decoded in group["decoding"]:
            key = (json.dumps(decoded["prompt"], sort_keys=True), decoded["mode"])
            if previous.get(key) != decoded["tokens"]:
                changes.append(f"{name}: {_describe(decoded['prompt'], decoded['mode'])} tokens changed")
    # The models the folder carries in subfolders (canary-1b-v2's aligner): the same comparison, under their name.
    old_parts = old.get("parts", {})
    for name, part in new.get("parts", {}).items():
        if name not in old_parts:
            changes.append(f"{name}: new part")
            continue
        changes += [f"{name}: {line}" for line in golden_changes(old_parts[name], part)
                    if not line.startswith("made by")]
    return changes


def _replace_file(path: Path, text: str) -> None:
    """Write beside, then rename over: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# --- verify --against ---------------------------------------------------------------------------------------


def _layers(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a folder by the bundled model's parameter names, quantized layers dequantized; and the
    layout's `added` pairs (a parameter stored summed into another)."""
    config = read_config(folder_file(folder, CONFIG_FILE))
    weights = read_tensors(folder, config)  # under the bundled model's names, whatever the layout
    options = read_quantization(config.quantization)[0] if config.quantization else None
    layers = {}
    for key, value in weights.items():
        if key.endswith((".scales", ".biases")):
            continue
        path = key.removesuffix(".weight")
        if options is not None and f"{path}.scales" in weights:
            value = mx.dequantize(value, weights[f"{path}.scales"], weights.get(f"{path}.biases"),
                                  group_size=options.group_size, bits=options.bits, mode=options.mode)
        layers[key] = np.array(value.astype(mx.float32))
    return layers, dict(config.layout.added) if config.layout is not None else {}


def _summed(layers: dict[str, np.ndarray], added: Mapping[str, str]) -> dict[str, np.ndarray]:
    """`layers` with each added pair as one sum under the name that holds it (parakeet-mlx's one LSTM bias is
    torch's two), so folders in either layout compare as the model computes with them."""
    summed = dict(layers)
    for name, into in added.items():
        if name in summed and into in summed:
            summed[into] = summed[into] + summed.pop(name)
    return summed


def compare_folders(first: Path, second: Path, target: str, device: str) -> VerifyReport:
    """Tensor by tensor (quantized layers dequantized), config and goldens: did anything change?"""
    use_device(device)
    report = VerifyReport(target=target, device=device)
    for folder in (first, second):
        read_record(folder)
    try:
        (ours, first_added), (theirs, second_added) = _layers(first), _layers(second)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelFolderError(f"{target}: a folder does not load: {exc}") from None
    added = {**first_added, **second_added}
    ours, theirs = _summed(ours, added), _summed(theirs, added)
    names = sorted(set(ours) | set(theirs))
    differing = []
    for key in names:
        if key not in theirs or key not in ours:
            differing.append(Check(f"tensor {key}", "fail", f"only in {first if key in ours else second}",
                                   stage="weights"))
        elif ours[key].shape != theirs[key].shape:
            differing.append(Check(f"tensor {key}", "fail", f"shape {ours[key].shape} vs {theirs[key].shape}",
                                   stage="weights"))
        elif not np.array_equal(ours[key], theirs[key]):
            a, b = ours[key], theirs[key]
            relative = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(a)), 1e-30))
            differing.append(Check(f"tensor {key}", "fail", f"max |Δ| {np.abs(a - b).max():.2e}, relative L2 "
                                   f"{relative:.2e}", stage="weights"))
    report.checks.append(Check("tensors", "fail" if differing else "pass",
                               f"{len(names) - len(differing)} of {len(names)} tensors identical", stage="weights"))
    report.checks += differing
    config_changes = config_differences(read_json(folder_file(first, CONFIG_FILE)),
                                        read_json(folder_file(second, CONFIG_FILE)))
    report.checks.append(Check("config", "fail" if config_changes else "pass",
                               "; ".join(config_changes) or "config.json identical", "config.json", "config"))
    paths = [folder / GOLDENS_FILE for folder in (first, second)]
    if all(path.is_file() for path in paths):
        changes = golden_changes(read_goldens(paths[0]), read_goldens(paths[1]))
        meaningful = [c for c in changes if not c.startswith("made by")]
        report.checks.append(Check("goldens", "fail" if meaningful else "pass", "; ".join(changes) or "identical",
                                   GOLDENS_FILE))
    return report
