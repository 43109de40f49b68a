"""Prove a written MLX folder right: it loads strictly into the bundled model, and every stored tensor,
transformed back, equals its source (bit for bit at the stored dtype); each quantized layer equals
`mx.quantize` of its source exactly, and its quantization error is measured."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import torch
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

from .errors import ModelFolderError, ValidationError
from .model.speech import SpeechModel
from .model.load import CONFIG_FILE, load_model, read_config, tensor_files
from .model.cpu.mapped import map_safetensors
from .quantize import QuantizationError, QuantizationPlan, quantization_error, quantize_tensor
from .rules import TensorPlan
from .writer import OutputTensor


@dataclass(frozen=True)
class ValidationReport:
    parameters: int
    round_trip_tensors: int
    quantization_errors: list[QuantizationError] = field(default_factory=list)  # worst (relative L2) first

    def to_dict(self) -> dict[str, object]:
        record: dict[str, object] = {"passed": True, "strict_load": "ok", "parameters": self.parameters,
                                     "round_trip": "exact", "tensors": self.round_trip_tensors}
        if self.quantization_errors:
            record["quantization_errors"] = [error.to_dict() for error in self.quantization_errors]
        return record


def check_strict_load(folder: Path) -> SpeechModel:
    """Load `folder` as users will (`load_model`); any missing, extra or misshapen parameter fails."""
    try:
        return load_model(folder)
    except ModelFolderError as exc:
        raise ValidationError(f"does not load strictly into the bundled MLX model: {exc}") from None


def _stored_keys(folder: Path, files: Sequence[Path] | None = None) -> dict[str, Path]:
    """Every tensor name in the folder's tensor files (those its config.json names unless `files` does),
    with its file; the files must be MLX's."""
    where: dict[str, Path] = {}
    for file in files if files is not None else tensor_files(folder, read_config(folder / CONFIG_FILE)):
        try:
            with safe_open(str(file), framework="numpy") as handle:
                if handle.metadata().get("format") != "mlx":
                    raise ValidationError(f"{file}: safetensors metadata lacks format=mlx")
                where.update((key, file) for key in handle.keys())
        except SafetensorError as exc:
            raise ValidationError(f"{file}: unreadable safetensors file: {exc}") from None
    return where


def check_round_trip(folder: Path, stored: Sequence[OutputTensor], source: Mapping[str, torch.Tensor],
                     quantization: QuantizationPlan | None = None,
                     files: Sequence[Path] | None = None) -> list[QuantizationError]:
    """Read every stored tensor back and compare it with its source: float tensors transformed back and
    compared with the source cast to the stored dtype, quantized layers with mx.quantize of the source.
    (A LoRA-merged weight's source is the float32 merge: `Plan.sources`.)

    Returns each quantized layer's error, worst first."""
    planned = {tensor.key: tensor for tensor in stored}
    where = _stored_keys(folder, files)
    if extra := sorted(set(where) - set(planned)):
        raise ValidationError(f"{where[extra[0]]}: holds {extra[0]}, which the plan does not")
    if missing := sorted(set(planned) - set(where)):
        raise ValidationError(f"{folder}: {len(missing)} planned tensor(s) missing from the weight files: {missing[0]}")
    quantized: dict[TensorPlan, list[OutputTensor]] = defaultdict(list)
    for file in sorted(set(where.values())):
        with safe_open(str(file), framework="pt") as handle:
            for key in (key for key, found in where.items() if found == file):
                tensor = planned[key]
                if tensor.part is not None:
                    quantized[tensor.plan].append(tensor)
                    continue
                restored = tensor.plan.restore(handle.get_tensor(key))
                expected = source[tensor.plan.source_key].to(tensor.dtype)
                if restored.dtype != expected.dtype or not torch.equal(restored, expected):
                    raise ValidationError(f"{file}: {key} does not transform back to {tensor.plan.source_key}")
    return _check_quantized(where, quantized, source, quantization) if quantized else []


def _check_quantized(where: Mapping[str, Path], layers: Mapping[TensorPlan, list[OutputTensor]],
                     source: Mapping[str, torch.Tensor], quantization: QuantizationPlan | None) -> list[QuantizationError]:
    if quantization is None:
        raise ValidationError("the folder holds quantized layers but the conversion planned none")
    options = quantization.options
    # Mapped: each layer's parts are copied in for their comparison only, so at most one layer is held.
    files = {file: map_safetensors(file) for file in set(where.values())}
    errors = []
    for plan, parts in layers.items():
        weights = source[plan.source_key]
        expected = quantize_tensor(plan, weights, parts[0].dtype, options)
        read = {tensor.part: files[where[tensor.key]][tensor.key].load() for tensor in parts}
        for tensor in parts:
            array, want = read[tensor.part], expected[tensor.part]
            if array.dtype != want.dtype or not mx.array_equal(array, want).item():
                raise ValidationError(f"{where[tensor.key]}: {tensor.key} is not mx.quantize of {plan.source_key}")
        reference = plan.convert(weights, torch.float32).numpy()
        errors.append(quantization_error(plan.target_key, read, reference, options))
    return sorted(errors, key=lambda error: error.rel_l2, reverse=True)


def validate_folder(folder: Path, stored: Sequence[OutputTensor], source: Mapping[str, torch.Tensor],
                    quantization: QuantizationPlan | None = None) -> tuple[ValidationReport, SpeechModel]:
    """Both proofs; returns the report and the strictly loaded model (for parity and the goldens)."""
    model = check_strict_load(folder)
    errors = check_round_trip(folder, stored, source, quantization)
    return ValidationReport(len(tree_flatten(model.parameters())), len(stored), errors), model
