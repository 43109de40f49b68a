"""The MLX model's `config.json`, as dataclasses.

Field names follow NeMo's own config names so a reader can check them against `model_config.yaml`; the
preset (configs/*.yaml) derives every value from the checkpoint, nothing about sizes is fixed here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection
from types import UnionType
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from ..errors import ModelFolderError
from ..untrusted import read_json

T = TypeVar("T")

# Limits on config numbers, checked before any model is built (README "Security model"): far above every
# NeMo model (canary-1b's widths are 1024 and 4096, its layers 24 and 32), far below what would make building
# or running the model exhaust memory. No number anywhere in the config may exceed MAX_CONFIG_INT.
MAX_CONFIG_INT = 1 << 20
MAX_WIDTH = 1 << 16  # a feature, model or feed-forward width, a head count, a window in samples
MAX_LAYERS = 1024
MAX_BEAM = 256


class ConfigValueError(ValueError):
    """A config value the bundled model cannot be built with; `path` is its dotted place in config.json."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def under(self, parent: str) -> ConfigValueError:
        return ConfigValueError(f"{parent}.{self.path}", self.problem)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type a field's hint names (a bool is not a number, 128.0 not an int)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if args := (get_args(hint) if get_origin(hint) in (Union, UnionType) else ()):
        return any(_fits(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_CONFIG_INT
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and abs(value) <= MAX_CONFIG_INT)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if get_origin(hint) is list and get_args(hint):
        return isinstance(value, list) and all(_fits(item, get_args(hint)[0]) for item in value)
    return isinstance(value, get_origin(hint) or hint)


def _describe(hint: Any) -> str:
    names = {int: f"a whole number within +-{MAX_CONFIG_INT}", float: f"a finite number within +-{MAX_CONFIG_INT}",
             bool: "true or false", str: "a string", type(None): "null", dict: "an object", list: "a list"}
    args = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return " or ".join(f"a list, each {_describe(get_args(arg)[0])}" if get_origin(arg) is list and get_args(arg)
                       else names.get(get_origin(arg) or arg, "an object") for arg in args)


def check_range(config: Any, name: str, low: int, high: int) -> None:
    """Refuse a field outside [low, high] by name (for a dataclass's `__post_init__`)."""
    value = getattr(config, name)
    if value is not None and not low <= value <= high:
        raise ConfigValueError(name, f"{value!r} is outside {low}..{high}")


def without_paths(data: dict[str, Any], paths: Collection[str]) -> dict[str, Any]:
    """`data` less the entries at these dotted paths (`joint.vocabulary`: the `vocabulary` of section `joint`)."""
    kept = dict(data)
    for path in paths:
        head, _, rest = path.partition(".")
        if not rest:
            kept.pop(head, None)
        elif isinstance(kept.get(head), dict):
            kept[head] = without_paths(kept[head], [rest])
    return kept


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a dict, refusing unknown and missing fields by name, and values of the
    wrong type or out of range by their dotted path (ConfigValueError)."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name in known & set(data):
        value, hint = data[name], hints[name]
        if not _fits(value, hint):
            raise ConfigValueError(name, f"{value!r} is not {_describe(hint)}")
        # An optional section (`X | None`) is built as X when present.
        kind = next((arg for arg in getattr(hint, "__args__", ()) if dataclasses.is_dataclass(arg)), hint)
        try:
            values[name] = _from_dict(kind, value) if dataclasses.is_dataclass(kind) and value is not None else value
        except ConfigValueError as exc:
            raise exc.under(name) from None
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

    def __post_init__(self) -> None:
        check_range(self, "sample_rate", 1, MAX_CONFIG_INT)
        check_range(self, "features", 1, MAX_WIDTH)
        for name in ("n_fft", "n_window_size", "n_window_stride"):
            check_range(self, name, 1, MAX_WIDTH)
        for name, samples in (("window_size", self.win_length), ("window_stride", self.hop_length)):
            if not 1 <= samples <= MAX_WIDTH:
                raise ConfigValueError(name, f"{getattr(self, name)!r} s at {self.sample_rate} Hz is {samples} "
                                             f"samples, outside 1..{MAX_WIDTH}")
        check_range(self, "pad_to", 0, MAX_WIDTH)

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

    def __post_init__(self) -> None:
        for name in ("feat_in", "d_model", "n_heads", "ff_expansion_factor", "conv_kernel_size"):
            check_range(self, name, 1, MAX_WIDTH)
        check_range(self, "n_layers", 1, MAX_LAYERS)
        check_range(self, "subsampling_factor", 1, MAX_WIDTH)
        check_range(self, "subsampling_conv_channels", -1, MAX_WIDTH)
        check_range(self, "pos_emb_max_len", 1, MAX_CONFIG_INT)
        if self.subsampling_conv_channels == 0:
            raise ConfigValueError("subsampling_conv_channels", "0 is neither -1 (d_model) nor a width")
        if self.d_model % self.n_heads:
            raise ConfigValueError("n_heads", f"{self.n_heads} does not divide d_model {self.d_model}")

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

    def __post_init__(self) -> None:
        for name in ("hidden_size", "inner_size", "num_attention_heads"):
            check_range(self, name, 1, MAX_WIDTH)
        check_range(self, "num_layers", 1, MAX_LAYERS)
        check_range(self, "max_sequence_length", 1, MAX_CONFIG_INT)
        check_range(self, "vocab_size", 1, MAX_CONFIG_INT)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigValueError("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size "
                                                          f"{self.hidden_size}")


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

    def __post_init__(self) -> None:
        check_range(self, "beam_size", 1, MAX_BEAM)


@dataclass(frozen=True)
class LayoutConfig:
    """How the bundled model reads a folder written for another library (`canary-convert --layout NAME`).

    The conversion records it from both mapping files: the stored tensors' names in that library and the
    bundled model's name for each (None for a tied copy the bundled model does not keep).
    """

    name: str
    mapping: str
    foreign_keys: list[str]  # config.json entries (dotted paths) that library reads and the bundled model does not
    side_files: list[str]  # tensor files only the bundled model reads (that library recomputes them)
    rename: dict[str, str | None]
    # The bundled model's parameters the folder holds added into another (parakeet-mlx's LSTM bias is torch's
    # bias_ih + bias_hh): each read as zeros, the sum standing in the parameter named beside it.
    added: dict[str, str] = field(default_factory=dict)
    # The bundled model's shape of a tensor stored in another shape of the same element order (a kernel-1 Conv1d
    # weight, which the bundled model holds as a Linear weight).
    reshape: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SpeechConfig:
    """What every family's `config.json` holds: the shared FastConformer front (preprocessor, encoder), the
    tokenizer, and the folder's storage records. `model_type` names the family's model class (load.py's
    registry); each family's config adds its head's sections."""

    model_type: str
    family: str
    sample_rate: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    tokenizer: TokenizerConfig
    # mlx-lm's convention for quantized folders (see quantized.py); absent in float folders.
    quantization: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None
    layout: LayoutConfig | None = None  # absent in canary-convert's own layout

    # Sections written only when set (folders written before they existed read the same).
    _optional: ClassVar[tuple[str, ...]] = ("quantization", "quantization_config", "layout")

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config, leaving out the entries another library's layout added for that library."""
        layout = data.get("layout") or {}
        foreign = layout.get("foreign_keys", []) if isinstance(layout, dict) else []
        if not isinstance(foreign, list) or not all(isinstance(path, str) for path in foreign):
            raise ValueError("layout.foreign_keys: not a list of dotted names")
        return _from_dict(cls, without_paths(data, foreign))

    @classmethod
    def from_file(cls: type[C], path: Path) -> C:
        data = read_json(path)  # bounded: the folder may come from anywhere
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path}: not a JSON object")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:  # TypeError: a foreign_keys entry that cannot be a key
            raise ModelFolderError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in self._optional:
            if data[name] is None:
                del data[name]
        return data


C = TypeVar("C", bound=SpeechConfig)


@dataclass(frozen=True, kw_only=True)
class ModelConfig(SpeechConfig):
    """The Canary encoder-decoder (`model_type: canary`): everything the bundled MLX model needs to rebuild
    the checkpoint's architecture."""

    prompt_format: str
    decoder: DecoderConfig
    encoder_decoder_proj: bool
    decoding: DecodingConfig
    # The checkpoint carries NeMo's CTC timestamps model (canary-1b-v2): NeMo then chunks long audio itself
    # and takes timestamps from that model. Absent in folders written before this field existed.
    timestamps_asr_model: bool = False
    # NeMo's `prompt_defaults` as the checkpoint has them (role/slots turns): the prompt slots transcribe()
    # uses when the caller gives none (prompts.default_slots reads them).
    prompt_defaults: list[dict[str, Any]] | None = None

    _optional: ClassVar[tuple[str, ...]] = SpeechConfig._optional + ("prompt_defaults",)


@dataclass(frozen=True)
class CTCHeadConfig:
    """NeMo's ConvASRDecoder: a 1x1 convolution to the vocabulary plus the blank (the last class)."""

    num_classes: int  # the vocabulary and the blank

    def __post_init__(self) -> None:
        check_range(self, "num_classes", 2, MAX_CONFIG_INT)

    @property
    def blank_id(self) -> int:
        # NeMo's CTC decoding: blank_id = the tokenizer's vocab_size, the head's last output
        return self.num_classes - 1


@dataclass(frozen=True, kw_only=True)
class CTCConfig(SpeechConfig):
    """NeMo's EncDecCTCModelBPE (`model_type: ctc`): FastConformer encoder and a CTC head, greedy decoding."""

    ctc: CTCHeadConfig
