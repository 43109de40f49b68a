"""Prove a written MLX folder right: it loads strictly into the bundled model, and every stored tensor,
transformed back, equals its source (bit for bit at the stored dtype)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

from .errors import ModelFolderError, ValidationError
from .model.load import load_model, weight_files
from .writer import OutputTensor


@dataclass(frozen=True)
class ValidationReport:
    parameters: int
    round_trip_tensors: int

    def to_dict(self) -> dict[str, object]:
        return {"strict_load": "ok", "parameters": self.parameters, "round_trip": "exact", "tensors": self.round_trip_tensors}


def check_strict_load(folder: Path) -> int:
    """Load `folder` as users will (`load_model`); any missing, extra or misshapen parameter fails."""
    try:
        model = load_model(folder)
    except ModelFolderError as exc:
        raise ValidationError(f"does not load strictly into the bundled MLX model: {exc}") from None
    return len(tree_flatten(model.parameters()))


def check_round_trip(folder: Path, stored: Sequence[OutputTensor], source: Mapping[str, torch.Tensor]) -> int:
    """Read every stored tensor back, undo its transforms and compare with the source cast to the stored dtype."""
    planned = {tensor.plan.target_key: tensor for tensor in stored}
    seen = 0
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                if handle.metadata().get("format") != "mlx":
                    raise ValidationError(f"{file}: safetensors metadata lacks format=mlx")
                for key in handle.keys():
                    tensor = planned.get(key)
                    if tensor is None:
                        raise ValidationError(f"{file}: holds {key}, which the plan does not")
                    restored = tensor.plan.restore(handle.get_tensor(key))
                    expected = source[tensor.plan.source_key].to(tensor.dtype)
                    if restored.dtype != expected.dtype or not torch.equal(restored, expected):
                        raise ValidationError(f"{file}: {key} does not transform back to {tensor.plan.source_key}")
                    seen += 1
        except SafetensorError as exc:
            raise ValidationError(f"{file}: unreadable safetensors file: {exc}") from None
    if seen != len(planned):
        raise ValidationError(f"{folder}: {len(planned) - seen} planned tensor(s) missing from the weight files")
    return seen


def validate_folder(folder: Path, stored: Sequence[OutputTensor], source: Mapping[str, torch.Tensor]) -> ValidationReport:
    return ValidationReport(parameters=check_strict_load(folder), round_trip_tensors=check_round_trip(folder, stored, source))
