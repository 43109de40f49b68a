"""The MLX model's `config.json`, as dataclasses.

Field names follow NeMo's own config names so a reader can check them against `model_config.yaml`; the
preset (configs/*.yaml) derives every value from the checkpoint, nothing about sizes is fixed here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from ..errors import ModelFolderError
from ..untrusted import read_json

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a dict, refusing unknown and missing fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name in known & set(data):
        value, hint = data[name], hints[name]
        # An optional section (`X | None`) is built as X when present.
        kind = next((arg for arg in getattr(hint, "__args__", ()) if dataclasses.is_dataclass(arg)), hint)
        values[name] = _from_dict(kind, value) if dataclasses.is_dataclass(kind) and value is not None else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None


@dataclass(frozen=True)
class PreprocessorConfig:
    """NeMo's AudioToMelSpectrogramPreprocessor settings that matter at inference."""

    sample_rate: int
    features: int
    n_fft: int | None
    window_size: float
    window_stride: float
    n_window_size: int | None
    n_window_stride: int | None
    window: str
    normalize: str
    log: bool
    log_zero_guard_type: str
    log_zero_guard_value: float
    preemph: float
    mag_power: float
    pad_to: int
    pad_value: float
    exact_pad: bool

    @property
    def win_length(self) -> int:
        # NeMo: an explicit n_window_size wins, else int(window_size * sample_rate)
        return self.n_window_size or int(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        # NeMo: an explicit n_window_stride wins, else int(window_stride * sample_rate)
        return self.n_window_stride or int(self.window_stride * self.sample_rate)

    @property
    def fft_size(self) -> int:
        # NeMo: without n_fft, the next power of two at or above the window length
        return self.n_fft or 2 ** math.ceil(math.log2(self.win_length))


@dataclass(frozen=True)
class EncoderConfig:
    """NeMo's ConformerEncoder settings (FastConformer with dw_striding subsampling)."""

    feat_in: int
    d_model: int
    n_layers: int
    n_heads: int
    ff_expansion_factor: int
    subsampling: str
    subsampling_factor: int
    subsampling_conv_channels: int
    conv_kernel_size: int
    conv_norm_type: str
    self_attention_model: str
    xscaling: bool
    untie_biases: bool
    pos_emb_max_len: int
    use_bias: bool

    @property
    def conv_channels(self) -> int:
        # NeMo: subsampling_conv_channels == -1 means "use d_model"
        return self.d_model if self.subsampling_conv_channels == -1 else self.subsampling_conv_channels


@dataclass(frozen=True)
class DecoderConfig:
    """NeMo's TransformerDecoderNM settings (`transf_decoder.config_dict`)."""

    hidden_size: int
    inner_size: int
    num_layers: int
    num_attention_heads: int
    max_sequence_length: int
    vocab_size: int
    hidden_act: str
    pre_ln: bool
    pre_ln_final_layer_norm: bool


@dataclass(frozen=True)
class TokenizerConfig:
    """Where the tokenizer files sit inside the MLX folder.

    `type` is `aggregate` (one SentencePiece model per entry of `langs`, concatenated in that order,
    `spl_tokens` first) or `bpe` (one model holding text and special tokens, as in canary-1b-v2).
    """

    type: str
    langs: dict[str, str] = field(default_factory=dict)
    model: str | None = None


@dataclass(frozen=True)
class DecodingConfig:
    """NeMo's `decoding` defaults for the checkpoint; each strategy has its own length budget."""

    strategy: str
    beam_size: int
    length_penalty: float
    max_generation_delta: int
    greedy_max_generation_delta: int


@dataclass(frozen=True)
class LayoutConfig:
    """How the bundled model reads a folder written for another library (`canary-convert --layout NAME`).

    The conversion records it from both mapping files: the stored tensors' names in that library and the
    bundled model's name for each (None for a tied copy the bundled model does not keep).
    """

    name: str
    mapping: str
    foreign_keys: list[str]  # config.json entries that library reads and the bundled model does not
    side_files: list[str]  # tensor files only the bundled model reads (that library recomputes them)
    rename: dict[str, str | None]


@dataclass(frozen=True)
class ModelConfig:
    """Everything the bundled MLX model needs to rebuild the checkpoint's architecture."""

    model_type: str
    family: str
    prompt_format: str
    sample_rate: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    encoder_decoder_proj: bool
    tokenizer: TokenizerConfig
    decoding: DecodingConfig
    # mlx-lm's convention for quantized folders (see quantized.py); absent in float folders.
    quantization: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None
    layout: LayoutConfig | None = None  # absent in canary-convert's own layout
    # The checkpoint carries NeMo's CTC timestamps model (not converted): NeMo then chunks long audio itself
    # and takes timestamps from that model. Absent in folders written before this field existed.
    timestamps_asr_model: bool = False
    # NeMo's `prompt_defaults` as the checkpoint has them (role/slots turns): the prompt slots transcribe()
    # uses when the caller gives none (prompts.default_slots reads them).
    prompt_defaults: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config, leaving out the entries another library's layout added for that library."""
        foreign = set((data.get("layout") or {}).get("foreign_keys", []))
        return _from_dict(cls, {key: value for key, value in data.items() if key not in foreign})

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        data = read_json(path)  # bounded: the folder may come from anywhere
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path}: not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("quantization", "quantization_config", "layout", "prompt_defaults"):
            if data[name] is None:
                del data[name]
        return data

