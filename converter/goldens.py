"""Golden outputs: what a converted folder's model gives on fixed test signals, recorded inside OUT at
conversion time (`goldens.json`), so `canary-convert verify` can check the folder anywhere, from itself.

Per group of signals (the synthetic test signals; the `--parity-audio` clips, referenced by sha256), run as
one padded batch that every stage and search starts from:
- each stage's fingerprint: per utterance, statistics of its valid region and the values at fixed
  pseudo-random positions (features; encoder states; teacher-forced log-probs on fixed tokens);
- per prompt (transcribe; translate when the tokenizer has a second language) and decoding mode (greedy,
  beam 4), the token ids, capped at `MAX_NEW_TOKENS` new tokens, and at each
  decoded position the gap between the two best log-probabilities (a near-tie below `Tolerances.near_tie`
  is where another backend may legitimately choose differently);
- when `--parity` ran, NeMo's own stage fingerprints (same positions) and token ids, as the reference.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import __version__
from .errors import CanaryConvertError
from .model.aed.canary import CanaryModel
from .model.app.clips import pad_batch
from .model.speech import AudioBatch, SpeechModel
from .model.aed.decoding import DecodingOptions, decode, strip_hypothesis
from .model.aed.prompts import PromptOptions, build_prompt
from .model.cpu.streaming import layers_streamed
from .untrusted import finite_number, read_json
from .parity import TOKEN_MODES, ParityReport, StageOutputs, reference_signals

GOLDENS_FILE = "goldens.json"
SCHEMA = "canary-convert/goldens"
SCHEMA_VERSION = 2  # 2: beam search without NeMo's tiled prompt cache; prompts batched
SAMPLES_PER_UTTERANCE = 256
MAX_NEW_TOKENS = 16  # enough to see decoding change; the stage fingerprints catch numeric drift
STAGES = ("features", "encoder", "logprobs")
_SEED = 20261127


class GoldensError(CanaryConvertError):
    """A golden file that cannot be trusted: unreadable, from another schema version, or edited by hand."""


@dataclass(frozen=True)
class Tolerances:
    """How far a stage may move before verify calls it a regression, per the weights' compute dtype.

    Set well below the parity limits (float32: features 1e-3, encoder 1e-4, log-probs 1e-3), and above the
    rounding differences between machines and MLX backends.
    """

    features_max_abs: float
    encoder_rel_l2: float
    logprobs_max_abs: float
    near_tie: float

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerances:
        if dtype == "float16":
            return cls(features_max_abs=1e-4, encoder_rel_l2=5e-3, logprobs_max_abs=5e-2, near_tie=5e-2)
        if dtype == "bfloat16":
            return cls(features_max_abs=1e-4, encoder_rel_l2=2e-2, logprobs_max_abs=2e-1, near_tie=0.25)
        return cls(features_max_abs=1e-4, encoder_rel_l2=1e-5, logprobs_max_abs=1e-4, near_tie=1e-3)

    def tightened(self, recorded: Mapping[str, float]) -> Tolerances:
        """These tolerances, with any recorded one that is tighter: a folder may ask for more, never less."""
        return replace(self, **{name: min(getattr(self, name), recorded[name]) for name in TOLERANCE_NAMES
                                if name in recorded})

    def limit(self, stage: str) -> float:
        return {"features": self.features_max_abs, "encoder": self.encoder_rel_l2,
                "logprobs": self.logprobs_max_abs}[stage]


TOLERANCE_NAMES = tuple(field.name for field in fields(Tolerances))


def _valid(stages: StageOutputs, stage: str, row: int) -> np.ndarray:
    """One utterance's valid region of a stage, flattened."""
    if stage == "features":
        return stages.features[row, :, : int(stages.frames[row])].ravel()
    if stage == "encoder":
        return stages.encoded[row, : int(stages.enc_lengths[row])].ravel()
    return stages.logprobs[row].ravel()


def fingerprint(stages: StageOutputs, stage: str, positions: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """Per utterance: statistics of the valid region and its values at fixed positions (chosen here when
    `positions` is None, reused from the goldens when given, so a reference is sampled where ours is)."""
    rows = []
    for row in range(len(stages.frames)):
        values = _valid(stages, stage, row).astype(np.float64)
        if positions is None:
            rng = np.random.default_rng(_SEED + row)
            chosen = np.sort(rng.choice(values.size, size=min(SAMPLES_PER_UTTERANCE, values.size), replace=False))
        else:  # a position outside this run's values (its size changed) is left out: the sizes then differ
            chosen = np.array([p for p in positions[row] if 0 <= p < values.size], dtype=np.int64)
        stats = {"l2": np.linalg.norm(values), "mean": values.mean(), "std": values.std(), "min": values.min(),
                 "max": values.max()}
        rows.append({"size": int(values.size), **{name: _float32(value) for name, value in stats.items()},
                     "positions": chosen.tolist(), "values": [_float32(value) for value in values[chosen]]})
    return rows


def _float32(value: float) -> float:
    """A float32 value with the 9 significant digits that represent it exactly (keeps the JSON small)."""
    return float(f"{value:.9g}")


def stage_distance(stage: str, golden: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> float:
    """How far `now` is from `golden` in the stage's own measure: max |Δ| (features, log-probs) or relative
    L2 (encoder), over the sampled values and the whole region's L2 norm. Infinite when the shapes or the
    number of utterances differ, or any value is not finite (NaN must never read as "no difference")."""
    if len(golden) != len(now):
        return float("inf")
    worst = 0.0
    for old, new in zip(golden, now):
        if old["size"] != new["size"] or len(old["values"]) != len(new["values"]):
            return float("inf")
        a, b = np.array(old["values"], dtype=np.float64), np.array(new["values"], dtype=np.float64)
        if stage == "encoder":
            distances = [np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30),
                         abs(new["l2"] - old["l2"]) / max(old["l2"], 1e-30)]
        else:
            distances = [np.abs(b - a).max(initial=0.0)]
        if not all(np.isfinite(distance) for distance in distances):
            return float("inf")
        worst = max(worst, *(float(distance) for distance in distances))
    return worst


def golden_prompts(model: CanaryModel) -> list[PromptOptions]:
    """Transcribe in the first language; translate into the second where the tokenizer has one."""
    assert model.tokenizer is not None
    languages = model.tokenizer.languages
    prompts = [PromptOptions(source_lang=languages[0])]
    if len(languages) > 1 and (model.config.prompt_format == "canary2"
                               or "<|translate|>" in model.tokenizer.special_tokens):
        prompts.append(PromptOptions(source_lang=languages[0], target_lang=languages[1], task="translate"))
    return prompts


def golden_modes(model: CanaryModel) -> dict[str, DecodingOptions]:
    """Greedy and beam 4 with the checkpoint's length penalty and budgets, each capped at MAX_NEW_TOKENS.

    Beam search without NeMo's cross-utterance prompt cache (`tile_prompt_cache=False`): each utterance's
    tokens are then what it gives alone, so the prompts can share one batch (`decode_prompts`).
    """
    default = replace(DecodingOptions.from_config(model.config.decoding), max_new_tokens=MAX_NEW_TOKENS,
                      tile_prompt_cache=False)
    return {name: replace(default, strategy=strategy, beam_size=beam) for name, (strategy, beam) in TOKEN_MODES.items()}


@dataclass(frozen=True)
class GroupRun:
    """One pass of the model over a group of signals as one padded batch: each stage's output, and the
    encoder states (as MLX arrays) that every golden prompt and mode decodes from."""

    stages: StageOutputs
    encoded: mx.array
    enc_lengths: mx.array
    batch: AudioBatch  # the features (and samples) the heads without prompts decode from


def run_group(model: SpeechModel, signals: Sequence[np.ndarray]) -> GroupRun:
    """Features, encoder states and the head's log-probs (`SpeechModel.stage_logprobs`) of a padded batch."""
    assert model.tokenizer is not None
    batch, lengths = pad_batch(list(signals))
    samples, counts = mx.array(batch), mx.array(lengths)
    features, frames = model.preprocess(samples, counts)
    encoded, enc_lengths = model.encode(features, frames)
    mx.eval(encoded, enc_lengths)
    logprobs = model.stage_logprobs(encoded, enc_lengths)
    as_numpy = lambda array: np.array(array.astype(mx.float32) if array.dtype != mx.int32 else array)  # noqa: E731
    stages = StageOutputs(as_numpy(features), as_numpy(frames), as_numpy(encoded), as_numpy(enc_lengths),
                          as_numpy(logprobs))
    return GroupRun(stages, encoded, enc_lengths, AudioBatch(features, frames, samples, counts))


def _tiled(run: GroupRun, times: int) -> tuple[mx.array, mx.array]:
    """The group's encoder states and lengths repeated `times` over: one copy of the group per prompt."""
    return mx.concatenate([run.encoded] * times), mx.concatenate([run.enc_lengths] * times)


def decode_prompts(model: CanaryModel, run: GroupRun, prompts: Sequence[PromptOptions],
                   options: DecodingOptions) -> list[list[list[int]]]:
    """Per prompt, per utterance of the group: the tokens of one decoding mode.

    Prompts of one length share one batch, one decoder call per step for all of them (each row's search
    is its own: rows of other prompts change nothing, see tests/test_decoding.py's batched-equals-alone).
    A shorter prompt would be padded, which moves its positions, so prompts of other lengths go apart.
    """
    assert model.tokenizer is not None
    if not options.is_greedy and options.beam_size > 1 and options.tile_prompt_cache:
        raise ValueError("prompts share a batch only without NeMo's tiled prompt cache (tile_prompt_cache=False)")
    ids = [build_prompt(model.config.prompt_format, model.tokenizer, prompt) for prompt in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt_ids in enumerate(ids):
        by_length.setdefault(len(prompt_ids), []).append(index)
    utterances = run.encoded.shape[0]
    tokens: list[list[list[int]]] = [[] for _ in prompts]
    for members in by_length.values():
        encoded, enc_lengths = _tiled(run, len(members))
        rows = [ids[index] for index in members for _ in range(utterances)]
        decoded = decode(model, encoded, enc_lengths, rows, options, model.tokenizer.eos_id, model.tokenizer.pad_id)
        for position, index in enumerate(members):
            tokens[index] = [result.tokens for result in decoded[position * utterances: (position + 1) * utterances]]
    return tokens


def gaps(model: CanaryModel, run: GroupRun, decoded: Sequence[tuple[PromptOptions, list[list[int]]]]
         ) -> list[list[list[float]]]:
    """For each (prompt, tokens per utterance): per utterance, at each decoded position (and the one after,
    where the search chose to stop), the gap between the two best log-probabilities. Every row is
    teacher-forced in one batch."""
    assert model.tokenizer is not None
    starts, rows = [], []
    for prompt, tokens in decoded:
        prompt_ids = build_prompt(model.config.prompt_format, model.tokenizer, prompt)
        starts += [len(prompt_ids) - 1] * len(tokens)
        rows += [(prompt_ids + ids)[: model.decoder.max_sequence_length] for ids in tokens]
    # Right-padded: causal attention keeps the padding out of every position a row reads.
    width = max(len(row) for row in rows)
    batch = mx.array([row + [model.tokenizer.pad_id] * (width - len(row)) for row in rows])
    logprobs = model.decoder_logprobs(batch, *_tiled(run, len(decoded)))
    top = np.array(mx.topk(logprobs, 2, axis=-1))  # unsorted: the gap is |a - b| either way
    spread = np.abs(top[..., 0] - top[..., 1])
    flat = [[round(float(gap), 6) for gap in spread[index, start: len(row)]]
            for index, (start, row) in enumerate(zip(starts, rows))]
    utterances = run.encoded.shape[0]
    return [flat[position * utterances: (position + 1) * utterances] for position in range(len(decoded))]


def decode_all(model: CanaryModel, run: GroupRun, wanted: Sequence[tuple[PromptOptions, DecodingOptions]]
               ) -> list[list[list[int]]]:
    """The tokens of each (prompt, mode) wanted, per utterance; the prompts of a mode decoded together."""
    by_options: dict[DecodingOptions, list[int]] = {}
    for index, (_, options) in enumerate(wanted):
        by_options.setdefault(options, []).append(index)
    tokens: list[list[list[int]]] = [[] for _ in wanted]
    for options, members in by_options.items():
        for index, decoded in zip(members, decode_prompts(model, run, [wanted[i][0] for i in members], options)):
            tokens[index] = decoded
    return tokens


def head_decodings(model: SpeechModel, run: GroupRun, modes: Sequence[str]) -> list[list[list[int]]]:
    """Per mode of `SpeechModel.golden_decoders` (a head without prompts), the tokens of each utterance."""
    decoders = model.golden_decoders()
    return [[decoded.tokens for decoded in decoders[mode](run.batch)] for mode in modes]


def decode_goldens(model: SpeechModel, run: GroupRun) -> list[dict[str, Any]]:
    """Token ids (and, for the prompted Canary head, near-tie gaps) of every golden prompt and mode."""
    if not isinstance(model, CanaryModel):
        modes = list(model.golden_decoders())
        # Greedy, the one mode a CTC head has (TOKEN_MODES' names); no search, so no length penalty or gaps.
        return [{"prompt": None, "mode": mode, "strategy": TOKEN_MODES[mode][0], "beam_size": TOKEN_MODES[mode][1],
                 "length_penalty": 0.0, "tokens": tokens, "gaps": [[] for _ in tokens]}
                for mode, tokens in zip(modes, head_decodings(model, run, modes))]
    wanted = [(prompt, (mode, options)) for prompt in golden_prompts(model) for mode, options in golden_modes(model).items()]
    tokens = decode_all(model, run, [(prompt, options) for prompt, (_, options) in wanted])
    spreads = gaps(model, run, [(prompt, ids) for (prompt, _), ids in zip(wanted, tokens)])
    return [{"prompt": asdict(prompt), "mode": mode, "strategy": options.strategy, "beam_size": options.beam_size,
             "length_penalty": options.length_penalty, "tokens": ids, "gaps": spread}
            for (prompt, (mode, options)), ids, spread in zip(wanted, tokens, spreads)]


def _group(model: SpeechModel, signals: list[np.ndarray], reference: StageOutputs | None,
           reference_tokens: Mapping[str, list[list[int]]] | None) -> dict[str, Any]:
    run = run_group(model, signals)
    group: dict[str, Any] = {"stages": {stage: fingerprint(run.stages, stage) for stage in STAGES},
                             "decoding": decode_goldens(model, run)}
    if reference is not None:
        group["reference"] = {
            "source": "NeMo (canary-convert --parity)",
            "stages": {stage: fingerprint(reference, stage, [row["positions"] for row in group["stages"][stage]])
                       for stage in STAGES},
            # NeMo's transcribe() in the first language with punctuation, uncapped.
            "tokens": dict(reference_tokens or {}),
        }
    return group


def _rows(stages: StageOutputs, rows: slice) -> StageOutputs:
    return StageOutputs(stages.features[rows], stages.frames[rows], stages.encoded[rows], stages.enc_lengths[rows],
                        stages.logprobs[rows])


def record_goldens(model: SpeechModel, clips: Sequence[tuple[str, np.ndarray, str]] = (),
                   parity: ParityReport | None = None, device: str = "cpu", folder: Path | None = None) -> dict[str, Any]:
    """The goldens of a loaded model. `clips` are (name, samples, sha256) of the `--parity-audio` files;
    `parity`, when it ran on the test signals followed by those clips, supplies NeMo's reference; `folder`,
    the model's own, lets each layer hold its weights only while it runs (`streaming.py`)."""
    sample_rate = model.config.preprocessor.sample_rate
    signals = reference_signals(sample_rate)
    split = len(signals)
    reference = parity.reference if parity is not None else None
    tokens = parity.reference_tokens if parity is not None else {}
    with layers_streamed(model, folder):
        groups = {"test-signals": _group(model, signals, reference and _rows(reference, slice(None, split)),
                                         {mode: ids[:split] for mode, ids in tokens.items()})}
        if clips:
            groups["audio"] = _group(model, [samples for _, samples, _ in clips],
                                     reference and _rows(reference, slice(split, None)),
                                     {mode: ids[split:] for mode, ids in tokens.items()})
            groups["audio"]["clips"] = [{"name": name, "sha256": digest} for name, _, digest in clips]
    groups["test-signals"]["signals"] = {"generator": "canary_convert.parity.reference_signals",
                                         "sample_rate": sample_rate, "sha256": signals_digest(signals)}
    dtype = str(model.compute_dtype).removeprefix("mlx.core.")
    # A model carried in a subfolder (canary-1b-v2's aligner) gets goldens of its own, on the same signals.
    parts = {name: record_goldens(part, clips, None, device, folder / name if folder is not None else None)
             for name, part in model.attached().items()}
    goldens = {
        "schema": SCHEMA, "version": SCHEMA_VERSION,
        "made_by": {"canary_convert": __version__, "mlx": mx.__version__, "platform": platform.platform(),
                    "device": device},
        "max_new_tokens": MAX_NEW_TOKENS,
        "tolerances": asdict(Tolerances.for_dtype(dtype)),
        "config": model.config.to_dict(),
        "groups": groups,
        **({"parts": parts} if parts else {}),
    }
    goldens["digest"] = goldens_digest(goldens)
    return goldens


def signals_digest(signals: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for signal in signals:
        digest.update(np.ascontiguousarray(signal, dtype=np.float32).tobytes())
    return "sha256:" + digest.hexdigest()


def goldens_digest(goldens: Mapping[str, Any]) -> str:
    """A digest of the goldens' content: an edit by hand that does not recompute it is detected."""
    content = {key: value for key, value in goldens.items() if key != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_goldens(path: Path, goldens: Mapping[str, Any]) -> None:
    """Compact JSON: the file is read by verify, and small enough to commit beside an example model."""
    path.write_text(json.dumps(goldens, separators=(",", ":")) + "\n")


def read_goldens(path: Path) -> dict[str, Any]:
    """Read a golden file, refusing one from another schema version, one edited by hand, or one not shaped
    as `record_goldens` writes it (`check_goldens`): the folder under test may be hostile."""
    goldens = read_json(path, GoldensError)
    if not isinstance(goldens, dict) or goldens.get("schema") != SCHEMA:
        raise GoldensError(f"{path}: not a canary-convert golden file (no schema {SCHEMA!r})")
    version = goldens.get("version")
    made_by = goldens.get("made_by")
    made_by = made_by.get("canary_convert", "an unknown version") if isinstance(made_by, dict) else "an unknown version"
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise GoldensError(
            f"{path}: golden schema version {version} (made by canary-convert {made_by}); this canary-convert "
            f"{__version__} reads version {SCHEMA_VERSION} only: "
            + ("upgrade canary-convert" if newer else "record them again with `canary-convert verify FOLDER --update`")
        )
    if goldens.get("digest") != goldens_digest(goldens):
        raise GoldensError(f"{path}: the content does not match its digest (edited by hand?); record the goldens "
                           "again with `canary-convert verify FOLDER --update`")
    check_goldens(goldens, path)
    return goldens


class _Shape:
    """Checks one JSON value against the shape `record_goldens` writes; the first mismatch is a
    GoldensError naming the file and the key (`groups.test-signals.stages.encoder[0].values[3]`)."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> GoldensError:
        return GoldensError(f"{self.path}: {key}: {problem}" if key else f"{self.path}: {problem}")

    def object(self, value: Any, key: str, required: Sequence[str] = (), optional: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, "not an object")
        if missing := [name for name in required if name not in value]:
            raise self.fail(key, f"no {missing[0]!r}")
        if optional is not None and (unknown := sorted(set(value) - set(required) - set(optional))):
            raise self.fail(key, f"unknown key {unknown[0]!r}")
        return value

    def array(self, value: Any, key: str, length: int | None = None) -> list:
        if not isinstance(value, list):
            raise self.fail(key, "not an array")
        if length is not None and len(value) != length:
            raise self.fail(key, f"{len(value)} entries, expected {length}")
        return value

    def number(self, value: Any, key: str, minimum: float | None = None) -> float:
        if not finite_number(value):
            raise self.fail(key, f"{value!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"{value!r} is below {minimum}")
        return value

    def integer(self, value: Any, key: str, low: int = 0, high: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            raise self.fail(key, f"{value!r} is not an integer in [{low}, {high if high is not None else '...'}]")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"{value!r} is not a string")
        return value

    def rows(self, value: Any, key: str, sampled: bool = True) -> None:
        """One stage's fingerprint: per utterance, the statistics and the values at positions inside it.
        `sampled`: the rows `fingerprint` chose positions for, as many as it samples (fewer would check less);
        a NeMo reference reuses those positions, minus any outside its own size."""
        for index, row in enumerate(self.array(value, key)):
            at = f"{key}[{index}]"
            self.object(row, at, ("size", "l2", "mean", "std", "min", "max", "positions", "values"))
            size = self.integer(row["size"], f"{at}.size")
            for name in ("l2", "mean", "std", "min", "max"):
                self.number(row[name], f"{at}.{name}")
            positions = self.array(row["positions"], f"{at}.positions")
            if len(positions) > SAMPLES_PER_UTTERANCE:
                raise self.fail(f"{at}.positions", f"{len(positions)} positions, at most {SAMPLES_PER_UTTERANCE}")
            if sampled and len(positions) != min(SAMPLES_PER_UTTERANCE, size):
                raise self.fail(f"{at}.positions", f"{len(positions)} positions, canary-convert samples "
                                                   f"{min(SAMPLES_PER_UTTERANCE, size)}")
            for number, position in enumerate(positions):
                self.integer(position, f"{at}.positions[{number}]", 0, size - 1)
            if len(set(positions)) != len(positions):
                raise self.fail(f"{at}.positions", "a position repeats")
            for number, sample in enumerate(self.array(row["values"], f"{at}.values", len(positions))):
                self.number(sample, f"{at}.values[{number}]")

    def token_rows(self, value: Any, key: str) -> list:
        for index, row in enumerate(self.array(value, key)):
            for number, token in enumerate(self.array(row, f"{key}[{index}]")):
                self.integer(token, f"{key}[{index}][{number}]")
        return value


_PROMPT_FIELDS = {field.name: field.type for field in fields(PromptOptions)}


def check_goldens(goldens: Mapping[str, Any], path: Path) -> None:
    """That a golden file has the shape `record_goldens` writes, every number finite, every position inside
    its stage, and only the decoding modes this tool records (greedy, beam 4: no beam of a million)."""
    shape = _Shape(path)
    shape.object(goldens, "", ("schema", "version", "digest", "made_by", "max_new_tokens", "tolerances",
                                    "config", "groups"), ("parts",))
    # The goldens of a model the folder carries in a subfolder (canary-1b-v2's aligner) have the same shape.
    for name, part in shape.object(goldens.get("parts", {}), "parts", optional=None).items():
        try:
            check_goldens(part, path)
        except GoldensError as exc:
            raise GoldensError(f"{exc} (in parts.{name})") from None
    shape.object(goldens["made_by"], "made_by", optional=None)
    shape.integer(goldens["max_new_tokens"], "max_new_tokens")
    tolerances = shape.object(goldens["tolerances"], "tolerances", TOLERANCE_NAMES)
    for name in TOLERANCE_NAMES:
        shape.number(tolerances[name], f"tolerances.{name}", minimum=0)
    shape.object(goldens["config"], "config", optional=None)
    groups = shape.object(goldens["groups"], "groups", ("test-signals",), optional=None)
    for name, group in groups.items():
        key = f"groups.{name}"
        extra = {"test-signals": "signals", "audio": "clips"}.get(name)
        if extra is None:
            raise shape.fail(key, "unknown group (expected test-signals or audio)")
        shape.object(group, key, ("stages", "decoding", extra), ("reference",))
        stages = shape.object(group["stages"], f"{key}.stages", STAGES)
        for stage in STAGES:
            shape.rows(stages[stage], f"{key}.stages.{stage}")
        if name == "test-signals":
            shape.string(shape.object(group["signals"], f"{key}.signals", ("sha256",), optional=None)["sha256"],
                         f"{key}.signals.sha256")
        else:
            for index, clip in enumerate(shape.array(group["clips"], f"{key}.clips")):
                shape.object(clip, f"{key}.clips[{index}]", ("name", "sha256"))
                shape.string(clip["name"], f"{key}.clips[{index}].name")
                shape.string(clip["sha256"], f"{key}.clips[{index}].sha256")
        if not shape.array(group["decoding"], f"{key}.decoding"):
            raise shape.fail(f"{key}.decoding", "no decoding recorded (canary-convert records greedy at least)")
        for index, decoded in enumerate(group["decoding"]):
            at = f"{key}.decoding[{index}]"
            shape.object(decoded, at, ("prompt", "mode", "strategy", "beam_size", "length_penalty", "tokens", "gaps"))
            # A head without prompts (CTC) records its modes with no prompt.
            prompt = ({} if decoded["prompt"] is None else
                      shape.object(decoded["prompt"], f"{at}.prompt", ("source_lang",), tuple(_PROMPT_FIELDS)))
            for field_name, value in prompt.items():
                kinds = {"bool": bool, "str": str, "str | None": (str, type(None))}[_PROMPT_FIELDS[field_name]]
                if not isinstance(value, kinds):
                    raise shape.fail(f"{at}.prompt.{field_name}", f"{value!r} is not a {_PROMPT_FIELDS[field_name]}")
            mode = (decoded["mode"], decoded["strategy"], decoded["beam_size"])
            if mode not in [(name, *options) for name, options in TOKEN_MODES.items()]:  # ==, no hashing
                raise shape.fail(f"{at}.mode", f"{mode!r} is not one of the recorded modes {TOKEN_MODES}")
            shape.number(decoded["length_penalty"], f"{at}.length_penalty")
            tokens = shape.token_rows(decoded["tokens"], f"{at}.tokens")
            for row, spread in enumerate(shape.array(decoded["gaps"], f"{at}.gaps", len(tokens))):
                for number, gap in enumerate(shape.array(spread, f"{at}.gaps[{row}]")):
                    shape.number(gap, f"{at}.gaps[{row}][{number}]", minimum=0)
        if "reference" in group:
            reference = shape.object(group["reference"], f"{key}.reference", ("stages", "tokens"), ("source",))
            stages = shape.object(reference["stages"], f"{key}.reference.stages", STAGES)
            for stage in STAGES:
                shape.rows(stages[stage], f"{key}.reference.stages.{stage}", sampled=False)
            for mode, rows in shape.object(reference["tokens"], f"{key}.reference.tokens", optional=None).items():
                shape.token_rows(rows, f"{key}.reference.tokens.{mode}")


def load_clips(paths: Sequence[Path], sample_rate: int) -> list[tuple[str, np.ndarray, str]]:
    """(name, samples, sha256 of the file) for each clip."""
    from .manifest import hash_file
    from .model.app.audio_io import load_audio

    return [(path.name, load_audio(path, sample_rate), hash_file(path).sha256) for path in paths]


def first_difference(old: Sequence[int], new: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (a length difference counts), or None."""
    for index, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return index
    return None if len(old) == len(new) else min(len(old), len(new))


def same_up_to_cap(golden_cap: int, reference: Sequence[int], ours: Sequence[int], eos_id: int, pad_id: int) -> bool:
    """Greedy search is step by step, so a capped run is the uncapped one's first tokens."""
    return list(ours) == strip_hypothesis(list(reference[:golden_cap]), eos_id, pad_id)
