"""The speech-LLM folder's `config.json` (canary-qwen): the audio half is ours, the LLM is an mlx-lm folder.

The preset (configs/canary-qwen.yaml) derives every value from the SALM checkpoint's own config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ModelFolderError
from ...untrusted import read_json
from ..config import EncoderConfig, PreprocessorConfig, _from_dict


@dataclass(frozen=True)
class ProjectionConfig:
    """SALM's `perception.proj`: a Linear from the encoder's width to the LLM's hidden size."""

    input_size: int
    output_size: int


@dataclass(frozen=True)
class GenerationConfig:
    """How `transcribe` prompts and decodes: NeMo's SALM.generate defaults (greedy, stop at the tokenizer's
    end of sequence) with a token budget per chunk, and the chunk length of long audio."""

    prompt: str  # the user turn; {audio} marks where the audio goes
    max_new_tokens: int
    chunk_seconds: float  # long audio is cut into windows no longer than this (NeMo trained on up to 40 s)


@dataclass(frozen=True)
class SpeechLLMConfig:
    """Everything the bundled speech-LLM needs: our front end, encoder and projection, and where the mlx-lm
    LLM folder is inside the folder."""

    model_type: str
    family: str
    sample_rate: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    projection: ProjectionConfig
    llm_folder: str  # a folder mlx_lm.load() reads as it is (config.json, tokenizer files, safetensors)
    llm_model_type: str
    audio_locator_tag: str
    prompt_format: str
    generation: GenerationConfig
    # mlx-lm's convention for quantized folders (see quantized.py); absent in float folders.
    quantization: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechLLMConfig:
        return _from_dict(cls, data)

    @classmethod
    def from_file(cls, path: Path) -> SpeechLLMConfig:
        data = read_json(path)  # bounded: the folder may come from anywhere
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path}: not a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("quantization", "quantization_config"):
            if data[name] is None:
                del data[name]
        return data
