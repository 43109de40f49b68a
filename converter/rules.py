"""The mapping engine: `mappings/*.yaml` rules -> a checked plan of (source key, target key, transform).

Every source key must be consumed by a rule or dropped with a reason; every parameter of the target MLX
model must be produced with its exact shape. The plan is computed from shapes alone (meta tensors), so
`--dry-run` and the coverage proof never touch the weights' bytes.

A mapping file may `include` another's rules (the FastConformer encoder's, shared by every family), with a
`prefix` its source keys carry in this checkpoint. A rule may `lora`-merge adapter factors into its weight:
the stored tensor is W + scale * B @ A, computed in float32 (`Plan.sources` gives the merged view every
later step reads), and the factors themselves are `folded` rules, each of which some merge must consume.
A rule may also `add` a twin key's tensor to its own (parakeet-mlx's LSTM has one bias where torch has
bias_ih and bias_hh): the stored tensor is the float32 sum, and the twin is a `folded` rule too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml

from .errors import MappingError, RulesFileError, one_line

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
        if (kind == "transpose" and isinstance(arg, list) and all(type(axis) is int for axis in arg)
                and sorted(arg) == list(range(len(arg)))):
            return _permutation(f"transpose{tuple(arg)}", arg)
    raise RulesFileError(f"{where}: unknown transform {spec!r} (conv1d, conv2d, squeeze: N, transpose: [..])")


@dataclass(frozen=True)
class LoraSpec:
    """A rule's adapter merge: the templates of the A (r, in) and B (out, r) factors' keys, and the name of
    the scale (alpha / r) the caller supplies from the checkpoint's config."""

    a: str
    b: str
    scale: str


def _parse_lora(raw: Any, pattern: re.Pattern[str], where: str) -> LoraSpec:
    if not isinstance(raw, dict) or set(raw) != {"a", "b", "scale"}:
        raise RulesFileError(f"{where}: 'lora' needs exactly a, b (key templates) and scale (a value's name)")
    for factor in ("a", "b"):
        missing = set(_PLACEHOLDER.findall(str(raw[factor]))) - set(pattern.groupindex)
        if missing:
            raise RulesFileError(f"{where}: lora {factor} {raw[factor]!r} uses {sorted(missing)} that the pattern lacks")
        _check_template(str(raw[factor]), pattern, f"{where}: lora {factor}")
    return LoraSpec(str(raw["a"]), str(raw["b"]), str(raw["scale"]))


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
    lora: LoraSpec | None = None
    add: str | None = None  # the template of a twin key whose tensor is added to this one's
    folded: str | None = None  # why the key is consumed by another rule's merge (a LoRA factor, an added twin)
    prefix: str = ""  # the source keys' prefix an `include` gave this rule
    included_from: str | None = None  # the included file this rule comes from
    number: int = 0  # its place in its own file (1-based), where that differs from index + 1

    def describe(self) -> str:
        where = f"{self.included_from} " if self.included_from else ""
        return f"{where}rule {self.number or self.index + 1} ({self.written})"

    def source_key(self, template: str, groups: Mapping[str, str]) -> str:
        """Another source key this rule names (a tied twin, a LoRA factor), under the include's prefix."""
        return self.prefix + template.format(**groups)


def _template_regex(template: str, prefix: str = "") -> re.Pattern[str]:
    """`a.{n}.b` -> `^a\\.(?P<n>[^.]+)\\.b$`: a placeholder stands for one dotted segment."""
    pieces: list[str] = [re.escape(prefix)]
    position = 0
    for found in _PLACEHOLDER.finditer(template):
        pieces.append(re.escape(template[position : found.start()]))
        pieces.append(f"(?P<{found.group(1)}>[^.]+)")
        position = found.end()
    pieces.append(re.escape(template[position:]))
    return re.compile("^" + "".join(pieces) + "$")


def _prefixed_regex(written: str, prefix: str) -> re.Pattern[str]:
    """A rule's regex for keys that carry `prefix` in front (an included file's rules)."""
    if not prefix:
        return re.compile(written)
    if not written.startswith("^"):
        raise re.error("an included rule's regex must start with ^")
    return re.compile("^" + re.escape(prefix) + written[1:])


# The rule fields that must have one type (None stands for absent where the field is optional).
_FIELD_TYPES = (("match", str, "a string"), ("regex", str, "a string"), ("to", str, "a string"),
                ("dtype", (str, type(None)), "a dtype name"), ("same_as", (str, type(None)), "a key template"),
                ("file", str, "a file name"), ("optional", bool, "true or false"), ("transforms", list, "a list"),
                ("add", str, "a key template"))


def _check_template(template: str, pattern: re.Pattern[str], what: str) -> None:
    """A key template (`a.{n}.b`) must format with the pattern's placeholders alone."""
    try:
        template.format(**{name: "x" for name in pattern.groupindex})
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise RulesFileError(f"{what} {template!r} is not a key template over the pattern's placeholders "
                             f"({one_line(exc)})") from None


def _parse_rule(index: int, raw: Any, label: str, prefix: str = "") -> Rule:
    where = f"{label}: rule {index + 1}"
    if not isinstance(raw, dict):
        raise RulesFileError(f"{where}: expected a mapping, got {raw!r}")
    allowed = {"match", "regex", "to", "drop", "folded", "transforms", "dtype", "same_as", "optional", "file", "lora",
               "add"}
    if unknown := sorted(set(raw) - allowed):
        raise RulesFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if ("match" in raw) == ("regex" in raw):
        raise RulesFileError(f"{where}: needs exactly one of 'match' (template) or 'regex'")
    if sum(field in raw for field in ("to", "drop", "folded")) != 1:
        raise RulesFileError(f"{where}: needs exactly one of 'to' (rename), 'drop' (with a reason) or 'folded' "
                             "(a factor another rule's lora merges, with a reason)")
    for name, kind, described in _FIELD_TYPES:
        if name in raw and not isinstance(raw[name], kind):
            raise RulesFileError(f"{where}: '{name}' must be {described}, got {raw[name]!r}")
    written = str(raw.get("match", raw.get("regex")))
    try:
        pattern = _template_regex(written, prefix) if "match" in raw else _prefixed_regex(written, prefix)
    except re.error as exc:
        raise RulesFileError(f"{where}: bad regex {written!r}: {one_line(exc)}") from None
    target = raw.get("to")
    if target is not None:
        missing = set(_PLACEHOLDER.findall(target)) - set(pattern.groupindex)
        if missing:
            raise RulesFileError(f"{where}: target {target!r} uses {sorted(missing)} that the pattern lacks")
        _check_template(target, pattern, f"{where}: target")
    if raw.get("same_as") is not None:
        _check_template(raw["same_as"], pattern, f"{where}: same_as")
    if "add" in raw:
        _check_template(raw["add"], pattern, f"{where}: add")
    dtype_name = raw.get("dtype")
    if dtype_name is not None and dtype_name not in _DTYPES:
        raise RulesFileError(f"{where}: dtype {dtype_name!r} is not one of {', '.join(_DTYPES)}")
    for kind in ("drop", "folded"):
        if kind in raw and not str(raw[kind]).strip():
            raise RulesFileError(f"{where}: a {kind} needs a reason")
    for merge in ("lora", "add"):
        if merge in raw and "to" not in raw:
            raise RulesFileError(f"{where}: '{merge}' merges into a renamed tensor; a drop stores nothing")
    if "lora" in raw and "add" in raw:
        raise RulesFileError(f"{where}: one merge per rule: 'lora' or 'add'")
    if "file" in raw and "to" not in raw:
        raise RulesFileError(f"{where}: 'file' names where a renamed tensor is stored; a drop stores nothing")
    return Rule(
        index=index,
        written=prefix + written if "match" in raw else written,
        pattern=pattern,
        target=target,
        drop_reason=str(raw["drop"]) if "drop" in raw else None,
        transforms=tuple(_parse_transform(spec, where) for spec in raw.get("transforms", [])),
        dtype=_DTYPES[dtype_name] if dtype_name else None,
        same_as=raw.get("same_as"),
        optional=bool(raw.get("optional", False)),
        file=str(raw["file"]) if "file" in raw else None,
        lora=_parse_lora(raw["lora"], pattern, where) if "lora" in raw else None,
        add=str(raw["add"]) if "add" in raw else None,
        folded=str(raw["folded"]) if "folded" in raw else None,
        prefix=prefix,
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
            raise RulesFileError(f"{label}: bad quantize regex {written!r}: {one_line(exc)}") from None
    return tuple(patterns)


def _shipped(file_name: str) -> bytes:
    resource = resources.files("canary_convert.mappings") / file_name
    if not resource.is_file():
        raise RulesFileError(f"mapping file {file_name!r} is not shipped with canary-convert")
    return resource.read_bytes()


def _load_yaml(text: bytes, label: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesFileError(f"{label}: not valid YAML: {one_line(exc)}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list) or "name" not in raw:
        raise RulesFileError(f"{label}: expected 'name' and a list of 'rules'")
    if unknown := sorted(set(raw) - {"name", "rules", "quantize"}):
        raise RulesFileError(f"{label}: unknown top-level field(s) {', '.join(unknown)}")
    return raw


def _expand(raw: dict[str, Any], label: str, prefix: str, included_from: str | None, start: int,
            read: Callable[[str], bytes], seen: tuple[str, ...]) -> tuple[list[Rule], list[re.Pattern[str]], list[str]]:
    """The file's rules with every `include` spliced in where it stands; also its quantize patterns and the
    digests of the files it includes."""
    rules: list[Rule] = []
    quantizable = list(_parse_quantizable(raw.get("quantize", []), label))
    digests: list[str] = []
    for position, item in enumerate(raw["rules"]):
        if isinstance(item, dict) and "include" in item:
            where = f"{label}: rule {position + 1}"
            if unknown := sorted(set(item) - {"include", "prefix"}):
                raise RulesFileError(f"{where}: an include takes only 'include' and 'prefix', not {', '.join(unknown)}")
            name = str(item["include"])
            if name in seen:
                raise RulesFileError(f"{where}: includes {name} in a loop ({' -> '.join(seen + (name,))})")
            text = read(name)
            included, patterns, nested = _expand(_load_yaml(text, name), name, prefix + str(item.get("prefix", "")),
                                                 name, start + len(rules), read, seen + (name,))
            rules += included
            quantizable += patterns
            digests += [name + ":" + hashlib.sha256(text).hexdigest(), *nested]
            continue
        rule = _parse_rule(start + len(rules), item, label, prefix)
        rules.append(dataclasses.replace(rule, included_from=included_from, number=position + 1))
    return rules, quantizable, digests


def parse_rules(text: bytes, label: str, read: Callable[[str], bytes] = _shipped) -> MappingRules:
    """Parse a mapping file; `read` gives the files it includes (by default, those shipped in the package).
    The digest covers the included files too."""
    rules, quantizable, included = _expand(_load_yaml(text, label), label, "", None, 0, read, (label,))
    digest = hashlib.sha256(text)
    for entry in included:
        digest.update(entry.encode())
    return MappingRules(
        name=str(_load_yaml(text, label)["name"]), file=label, digest="sha256:" + digest.hexdigest(),
        rules=tuple(rules), quantizable=tuple(quantizable),
    )


def load_rules(file_name: str) -> MappingRules:
    """Load a mapping shipped with the package (`mappings/<file_name>`)."""
    return parse_rules(_shipped(file_name), file_name)


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
    merge: LoraMerge | SumMerge | None = None  # what is merged into this tensor (adapter factors, an added twin)

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
class LoraMerge:
    """W + scale * B @ A for one weight: the factors' keys and the scale (alpha / r)."""

    a_key: str
    b_key: str
    scale: float

    @property
    def factors(self) -> tuple[str, ...]:
        return (self.a_key, self.b_key)

    def describe(self) -> str:
        return f"+ {self.scale:g} * B @ A (LoRA, float32)"

    def apply(self, weight: torch.Tensor, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The merged weight in float32 (as NeMo's serving plugin merges it), whatever the stored dtype."""
        a, b = source[self.a_key].to(torch.float32), source[self.b_key].to(torch.float32)
        return torch.addmm(weight.to(torch.float32), b, a, alpha=self.scale)


@dataclass(frozen=True)
class SumMerge:
    """This tensor plus a twin of the same shape (torch's LSTM bias_ih + bias_hh as one bias)."""

    twin_key: str

    @property
    def factors(self) -> tuple[str, ...]:
        return (self.twin_key,)

    def describe(self) -> str:
        return f"+ {self.twin_key} (float32)"

    def apply(self, tensor: torch.Tensor, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sum in float32, whatever the stored dtype (rounded once, when stored)."""
        return tensor.to(torch.float32) + source[self.twin_key].to(torch.float32)


class MergedSource(Mapping[str, torch.Tensor]):
    """The source as the plan's targets see it: each LoRA-merged weight (float32) in place of its base
    weight, computed when read; every other tensor as the source holds it."""

    def __init__(self, source: Mapping[str, torch.Tensor], merges: Mapping[str, LoraMerge | SumMerge]):
        self._source = source
        self._merges = merges

    def __getitem__(self, key: str) -> torch.Tensor:
        merge = self._merges.get(key)
        return self._source[key] if merge is None else merge.apply(self._source[key], self._source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)


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
    folded: tuple[DroppedKey, ...] = ()  # LoRA factors and added twins, each merged into a tensor of `tensors`

    def notes(self) -> list[str]:
        return [f"{rule.describe()} matched no key" for rule in self.unmatched_rules if not rule.optional]

    def sources(self, source: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What the writer and the round trip read: `source` with the planned merges applied."""
        merges = {tensor.source_key: tensor.merge for tensor in self.tensors if tensor.merge is not None}
        return MergedSource(source, merges) if merges else source

    def merges(self) -> list[TensorPlan]:
        return [tensor for tensor in self.tensors if tensor.merge is not None]


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" (and {len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else "")


def plan_conversion(
    mapping: MappingRules,
    source: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    side_expected: Mapping[str, tuple[int, ...]] | None = None,
    values: Mapping[str, float] | None = None,
) -> Plan:
    """Match every source key to a rule and prove the result fills `expected` (target name -> shape).

    Targets a rule sends to a side `file` are checked against `side_expected` instead (the shapes of the
    model that reads that file); `expected` must still be filled completely. `values` holds the numbers
    rules name (a LoRA merge's scale), taken from the checkpoint's config by the caller.
    """
    tensors: list[TensorPlan] = []
    dropped: list[DroppedKey] = []
    folded: list[DroppedKey] = []
    merged_factors: set[str] = set()
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
            _check_tied(key, rule.source_key(rule.same_as, groups), source)
        if rule.drop_reason is not None:
            dropped.append(DroppedKey(key, rule.drop_reason, rule))
            continue
        if rule.folded is not None:
            folded.append(DroppedKey(key, rule.folded, rule))
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
        merge: LoraMerge | SumMerge | None = None
        try:
            if rule.lora is not None:
                merge = _lora_merge(key, tuple(tensor.shape), rule, groups, source, values or {})
            elif rule.add is not None:
                merge = _sum_merge(key, tuple(tensor.shape), rule, groups, source)
        except MappingError as exc:
            problems.append(str(exc))
            continue
        if merge is not None:
            merged_factors.update(merge.factors)
        tensors.append(
            TensorPlan(key, target, tuple(tensor.shape), tuple(meta.shape), rule.transforms, rule.dtype, rule, merge)
        )

    if unknown:
        problems.insert(0, f"no rule in {mapping.file} for source key(s) {_name_keys(unknown)}")
    if stray := sorted(entry.key for entry in folded if entry.key not in merged_factors):
        problems.append(f"folded factor(s) that no merge consumes (the tensor they belong to is not one the mapping "
                        f"merges): {_name_keys(stray)}")
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
        folded=tuple(folded),
    )


def _lora_merge(key: str, shape: tuple[int, ...], rule: Rule, groups: Mapping[str, str],
                source: Mapping[str, torch.Tensor], values: Mapping[str, float]) -> LoraMerge:
    """The merge a rule declares for `key`, checked: both factors present, shapes (out, r) @ (r, in)."""
    assert rule.lora is not None
    a_key, b_key = rule.source_key(rule.lora.a, groups), rule.source_key(rule.lora.b, groups)
    if rule.lora.scale not in values:
        raise MappingError(f"{key}: {rule.describe()} merges LoRA with scale {rule.lora.scale!r}, "
                           "which the checkpoint's config does not give")
    for factor in (a_key, b_key):
        if factor not in source:
            raise MappingError(f"{key}: {rule.describe()} merges LoRA, but the checkpoint has no {factor}")
    a_shape, b_shape = tuple(source[a_key].shape), tuple(source[b_key].shape)
    if len(shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] \
            or (b_shape[0], a_shape[1]) != shape:
        raise MappingError(f"{key} {shape}: LoRA factors {a_key} {a_shape} and {b_key} {b_shape} do not make "
                           "B @ A of its shape")
    return LoraMerge(a_key, b_key, float(values[rule.lora.scale]))


def _sum_merge(key: str, shape: tuple[int, ...], rule: Rule, groups: Mapping[str, str],
               source: Mapping[str, torch.Tensor]) -> SumMerge:
    """The twin a rule adds to `key`, checked: present, of the same shape."""
    assert rule.add is not None
    twin = rule.source_key(rule.add, groups)
    if twin not in source:
        raise MappingError(f"{key}: {rule.describe()} adds {twin}, which the checkpoint lacks")
    if tuple(source[twin].shape) != shape:
        raise MappingError(f"{key} {shape}: {rule.describe()} adds {twin} of another shape {tuple(source[twin].shape)}")
    return SumMerge(twin)


def _check_tied(key: str, twin: str, source: Mapping[str, torch.Tensor]) -> None:
    if twin not in source:
        raise MappingError(f"{key} is mapped as a tied copy of {twin}, but the checkpoint has no {twin}")
    if source[key].shape != source[twin].shape or not torch.equal(source[key], source[twin]):
        raise MappingError(f"{key} is mapped as a tied copy of {twin}, but the two tensors differ")
