"""The mapping engine: `mappings/*.yaml` rules -> a checked plan of (source key, target key, transform).

Every source key must be consumed by a rule or dropped with a reason; every parameter of the target MLX
model must be produced with its exact shape. The plan is computed from shapes alone (meta tensors), so
`--dry-run` and the coverage proof never touch the weights' bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml

from .errors import MappingError, RulesFileError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_NAMED = 12  # how many offending keys an error message lists before summarising


@dataclass(frozen=True)
class Transform:
    """A reversible tensor layout change; the inverse proves the round trip."""

    label: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _permutation(label: str, order: list[int]) -> Transform:
    undo = sorted(range(len(order)), key=order.__getitem__)
    return Transform(label, lambda t: t.permute(*order), lambda t: t.permute(*undo))


def _squeeze(axis: int) -> Transform:
    return Transform(f"squeeze({axis})", lambda t: t.squeeze(axis), lambda t: t.unsqueeze(axis))


def _parse_transform(spec: Any, where: str) -> Transform:
    # torch Conv1d weights are (out, in, kernel); MLX wants (out, kernel, in)
    if spec == "conv1d":
        return _permutation("conv1d (O,I,K)->(O,K,I)", [0, 2, 1])
    # torch Conv2d weights are (out, in, h, w); MLX wants (out, h, w, in)
    if spec == "conv2d":
        return _permutation("conv2d (O,I,H,W)->(O,H,W,I)", [0, 2, 3, 1])
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, arg), = spec.items()
        if kind == "squeeze" and isinstance(arg, int):
            return _squeeze(arg)
        if kind == "transpose" and isinstance(arg, list) and sorted(arg) == list(range(len(arg))):
            return _permutation(f"transpose{tuple(arg)}", arg)
    raise RulesFileError(f"{where}: unknown transform {spec!r} (conv1d, conv2d, squeeze: N, transpose: [..])")


@dataclass(frozen=True)
class Rule:
    """One line of the mapping table: a key pattern and what becomes of the keys it fits."""

    index: int
    written: str  # the template or regex as the YAML file has it
    pattern: re.Pattern[str]
    target: str | None
    drop_reason: str | None
    transforms: tuple[Transform, ...]
    dtype: torch.dtype | None
    same_as: str | None
    optional: bool
    file: str | None  # a side file for tensors only canary-convert's model reads (None: the weight files)

    def describe(self) -> str:
        return f"rule {self.index + 1} ({self.written})"


def _template_regex(template: str) -> re.Pattern[str]:
    """`a.{n}.b` -> `^a\\.(?P<n>[^.]+)\\.b$`: a placeholder stands for one dotted segment."""
    pieces: list[str] = []
    position = 0
    for found in _PLACEHOLDER.finditer(template):
        pieces.append(re.escape(template[position : found.start()]))
        pieces.append(f"(?P<{found.group(1)}>[^.]+)")
        position = found.end()
    pieces.append(re.escape(template[position:]))
    return re.compile("^" + "".join(pieces) + "$")


def _parse_rule(index: int, raw: Any, label: str) -> Rule:
    where = f"{label}: rule {index + 1}"
    if not isinstance(raw, dict):
        raise RulesFileError(f"{where}: expected a mapping, got {raw!r}")
    allowed = {"match", "regex", "to", "drop", "transforms", "dtype", "same_as", "optional", "file"}
    if unknown := sorted(set(raw) - allowed):
        raise RulesFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if ("match" in raw) == ("regex" in raw):
        raise RulesFileError(f"{where}: needs exactly one of 'match' (template) or 'regex'")
    if ("to" in raw) == ("drop" in raw):
        raise RulesFileError(f"{where}: needs exactly one of 'to' (rename) or 'drop' (with a reason)")
    written = str(raw.get("match", raw.get("regex")))
    try:
        pattern = _template_regex(written) if "match" in raw else re.compile(written)
    except re.error as exc:
        raise RulesFileError(f"{where}: bad regex {written!r}: {exc}") from None
    target = raw.get("to")
    if target is not None:
        missing = set(_PLACEHOLDER.findall(target)) - set(pattern.groupindex)
        if missing:
            raise RulesFileError(f"{where}: target {target!r} uses {sorted(missing)} that the pattern lacks")
    dtype_name = raw.get("dtype")
    if dtype_name is not None and dtype_name not in _DTYPES:
        raise RulesFileError(f"{where}: dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    if "drop" in raw and not str(raw["drop"]).strip():
        raise RulesFileError(f"{where}: a drop needs a reason")
    if "file" in raw and "to" not in raw:
        raise RulesFileError(f"{where}: 'file' names where a renamed tensor is stored; a drop stores nothing")
    return Rule(
        index=index,
        written=written,
        pattern=pattern,
        target=target,
        drop_reason=str(raw["drop"]) if "drop" in raw else None,
        transforms=tuple(_parse_transform(spec, where) for spec in raw.get("transforms", [])),
        dtype=_DTYPES[dtype_name] if dtype_name else None,
        same_as=raw.get("same_as"),
        optional=bool(raw.get("optional", False)),
        file=str(raw["file"]) if "file" in raw else None,
    )


@dataclass(frozen=True)
class MappingRules:
    """A parsed mapping file, with the digest recorded in `conversion.json`.

    `quantizable` holds the patterns of the target weights `--quantize` may store quantized (MLX Linear
    and Embedding layers); every other tensor stays in float.
    """

    name: str
    file: str
    digest: str
    rules: tuple[Rule, ...]
    quantizable: tuple[re.Pattern[str], ...] = ()

    def is_quantizable(self, target_key: str) -> bool:
        return any(pattern.match(target_key) for pattern in self.quantizable)


def _parse_quantizable(raw: Any, label: str) -> tuple[re.Pattern[str], ...]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise RulesFileError(f"{label}: 'quantize' must be a list of regexes over target weight names")
    patterns = []
    for written in raw:
        if not written.endswith(r"\.weight$"):
            raise RulesFileError(f"{label}: quantize pattern {written!r} must end in \\.weight$ (a layer's weight)")
        try:
            patterns.append(re.compile(written))
        except re.error as exc:
            raise RulesFileError(f"{label}: bad quantize regex {written!r}: {exc}") from None
    return tuple(patterns)


def parse_rules(text: bytes, label: str) -> MappingRules:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesFileError(f"{label}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list) or "name" not in raw:
        raise RulesFileError(f"{label}: expected 'name' and a list of 'rules'")
    if unknown := sorted(set(raw) - {"name", "rules", "quantize"}):
        raise RulesFileError(f"{label}: unknown top-level field(s) {', '.join(unknown)}")
    rules = tuple(_parse_rule(index, item, label) for index, item in enumerate(raw["rules"]))
    return MappingRules(
        name=str(raw["name"]), file=label, digest="sha256:" + hashlib.sha256(text).hexdigest(), rules=rules,
        quantizable=_parse_quantizable(raw.get("quantize", []), label),
    )


def load_rules(file_name: str) -> MappingRules:
    """Load a mapping shipped with the package (`mappings/<file_name>`)."""
    resource = resources.files("canary_convert.mappings") / file_name
    if not resource.is_file():
        raise RulesFileError(f"mapping file {file_name!r} is not shipped with canary-convert")
    return parse_rules(resource.read_bytes(), file_name)


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor."""

    source_key: str
    target_key: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    transforms: tuple[Transform, ...]
    pinned_dtype: torch.dtype | None
    rule: Rule

    def convert(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Apply the layout transforms, then cast to the stored dtype."""
        for transform in self.transforms:
            tensor = transform.forward(tensor)
        return tensor.to(dtype).contiguous()

    def restore(self, tensor: torch.Tensor) -> torch.Tensor:
        """Undo the layout transforms (dtype aside): the round trip's way back to the source layout."""
        for transform in reversed(self.transforms):
            tensor = transform.inverse(tensor)
        return tensor


@dataclass(frozen=True)
class DroppedKey:
    key: str
    reason: str
    rule: Rule


@dataclass(frozen=True)
class Plan:
    """The checked plan: nothing unaccounted for on either side."""

    mapping: MappingRules
    tensors: tuple[TensorPlan, ...]
    dropped: tuple[DroppedKey, ...]
    unmatched_rules: tuple[Rule, ...]

    def notes(self) -> list[str]:
        return [f"{rule.describe()} matched no key" for rule in self.unmatched_rules if not rule.optional]


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" (and {len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else "")


def plan_conversion(
    mapping: MappingRules,
    source: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    side_expected: Mapping[str, tuple[int, ...]] | None = None,
) -> Plan:
    """Match every source key to a rule and prove the result fills `expected` (target name -> shape).

    Targets a rule sends to a side `file` are checked against `side_expected` instead (the shapes of the
    model that reads that file); `expected` must still be filled completely.
    """
    tensors: list[TensorPlan] = []
    dropped: list[DroppedKey] = []
    used: set[int] = set()
    unknown: list[str] = []
    produced: dict[str, str] = {}
    problems: list[str] = []

    for key, tensor in source.items():
        rule, found = next(
            ((rule, m) for rule in mapping.rules if (m := rule.pattern.match(key)) is not None), (None, None)
        )
        if rule is None or found is None:
            unknown.append(key)
            continue
        used.add(rule.index)
        groups = found.groupdict()
        # A tied copy (same_as) is checked equal to its twin, whether it is dropped or stored again.
        if rule.same_as is not None:
            _check_tied(key, rule.same_as.format(**groups), source)
        if rule.drop_reason is not None:
            dropped.append(DroppedKey(key, rule.drop_reason, rule))
            continue
        assert rule.target is not None
        target = rule.target.format(**groups)
        if target in produced:
            problems.append(f"{target} is produced by both {produced[target]} and {key}")
            continue
        produced[target] = key
        try:
            meta = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
            for transform in rule.transforms:
                meta = transform.forward(meta)
        except (RuntimeError, IndexError) as exc:
            problems.append(f"{key} {tuple(tensor.shape)}: {rule.describe()} cannot apply its transforms: {exc}")
            continue
        tensors.append(
            TensorPlan(key, target, tuple(tensor.shape), tuple(meta.shape), rule.transforms, rule.dtype, rule)
        )

    if unknown:
        problems.insert(0, f"no rule in {mapping.file} for source key(s) {_name_keys(unknown)}")
    for plan in tensors:
        want = (side_expected or {}).get(plan.target_key) if plan.rule.file else expected.get(plan.target_key)
        if want is None:
            problems.append(f"{plan.source_key} -> {plan.target_key}: the MLX model has no such parameter")
        elif tuple(want) != plan.target_shape:
            problems.append(
                f"{plan.source_key} -> {plan.target_key}: shape {plan.target_shape} "
                f"(from {plan.source_shape}), the MLX model expects {tuple(want)}"
            )
    missing = sorted(set(expected) - set(produced))
    if missing:
        problems.append(f"MLX parameter(s) that no source key fills: {_name_keys(missing)}")
    if problems:
        raise MappingError("the mapping does not fit the checkpoint: " + "; ".join(problems[:_MAX_NAMED]))
    return Plan(
        mapping=mapping,
        tensors=tuple(tensors),
        dropped=tuple(dropped),
        unmatched_rules=tuple(rule for rule in mapping.rules if rule.index not in used),
    )


def _check_tied(key: str, twin: str, source: Mapping[str, torch.Tensor]) -> None:
    if twin not in source:
        raise MappingError(f"{key} is mapped as a tied copy of {twin}, but the checkpoint has no {twin}")
    if source[key].shape != source[twin].shape or not torch.equal(source[key], source[twin]):
        raise MappingError(f"{key} is mapped as a tied copy of {twin}, but the two tensors differ")
