"""Tiny canary-qwen (NeMo speechlm2 SALM) checkpoints built offline with NeMo's own classes.

The Hub repo nvidia/canary-qwen-2.5b holds `config.json` (SALM's config) and one `model.safetensors`; the
LLM's tokenizer and config come from `pretrained_llm` (Qwen/Qwen3-1.7B). Here `pretrained_llm` is a local
folder written with transformers: a byte-level BPE tokenizer trained on a few lines, with Qwen's chat special
tokens, and a Qwen3 config of two layers. SALM builds the LLM from that config (random weights, as NeMo does
with `pretrained_weights: false`), installs LoRA with peft and a tiny FastConformer; the factory then gives
every norm, bias and LoRA B a random value (peft starts B at zero, which would hide a missing merge) and
saves the model as `SALM.save_pretrained` does.

Run as a script: `python tests/salm_factory.py OUT [VARIANT]`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import TinySpec, encoder_config, preprocessor_config

AUDIO_TAG = "<|audioplaceholder|>"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["the cat sat on the mat", "one two three four five six", "hello world this is a small test",
        "transcribe the following", "a quick brown fox jumps over the lazy dog", "user assistant system"]


@dataclass(frozen=True)
class SalmSpec:
    """One tiny shape; every width differs from the real model and from the other variants."""

    name: str
    features: int = 24
    d_model: int = 32  # FastConformer width (canary-qwen: 1024)
    enc_layers: int = 2
    enc_heads: int = 4
    subsampling_factor: int = 8
    conv_channels: int = 8
    conv_kernel: int = 5
    ff_expansion: int = 2
    hidden: int = 64  # Qwen3 hidden_size (Qwen3-1.7B: 2048)
    intermediate: int = 96
    llm_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    tie_embeddings: bool = True  # as Qwen3-1.7B
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    vocab_pad: int = 7  # embedding rows beyond the tokenizer (Qwen pads its vocabulary too)
    vocab_size: int = 0  # embedding rows in all, when set (a real size over the small tokenizer)
    max_positions: int = 1024
    seed: int = 0


VARIANTS = {
    spec.name: spec
    for spec in (
        SalmSpec("salm-tied-r8"),
        SalmSpec("salm-untied-r4", features=20, d_model=40, enc_heads=5, subsampling_factor=4, hidden=48,
                 intermediate=80, heads=3, kv_heads=1, head_dim=16, tie_embeddings=False, lora_rank=4,
                 lora_alpha=12, seed=1),
    )
}


def write_llm_folder(spec: SalmSpec, folder: Path) -> Path:
    """A stand-in for Qwen/Qwen3-1.7B's tokenizer and config (no weights), saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXT * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN_SPECIALS[1:])
    tokenizer.save_pretrained(str(folder))
    config = Qwen3Config(vocab_size=spec.vocab_size or len(tokenizer) + 1 + spec.vocab_pad, hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.llm_layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                         max_position_embeddings=spec.max_positions, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=spec.tie_embeddings, bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    config.save_pretrained(str(folder))
    return folder


def salm_config(spec: SalmSpec, llm_folder: Path) -> dict[str, Any]:
    """SALM's config in the shape of canary-qwen-2.5b's config.json, with tiny sizes."""
    encoder_spec = TinySpec(spec.name, features=spec.features, d_model=spec.d_model, enc_layers=spec.enc_layers,
                            enc_heads=spec.enc_heads, subsampling_factor=spec.subsampling_factor,
                            conv_channels=spec.conv_channels, conv_kernel=spec.conv_kernel,
                            ff_expansion=spec.ff_expansion)
    return {
        "pretrained_llm": str(llm_folder),
        "pretrained_asr": "nvidia/canary-1b-flash",
        "pretrained_weights": False,
        "audio_locator_tag": AUDIO_TAG,
        "prompt_format": "qwen",
        "freeze_params": [],
        "prevent_freeze_params": [],
        "lora": {"task_type": "CAUSAL_LM", "r": spec.lora_rank, "lora_alpha": spec.lora_alpha, "lora_dropout": 0.0,
                 "target_modules": list(spec.lora_targets)},
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "output_dim": spec.hidden,
            "preprocessor": preprocessor_config(encoder_spec),
            "encoder": encoder_config(encoder_spec),
            "modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                                 "d_model": spec.d_model},
        },
    }


def randomise(model: Any, seed: int) -> None:
    """factory.randomise's norms, biases and BatchNorm statistics, then random LoRA B factors (peft starts B
    at zero, which would hide a missing merge), wider output rows (larger logits: clear greedy margins) and
    LLM layers of unit gain."""
    import torch

    from factory import randomise as randomise_norms

    randomise_norms(model, seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
            elif "lm_head" in name or name.startswith("embed_tokens"):
                # Tied (one parameter, named once), the embedding is the output layer too: small rows keep the
                # last input token from dominating the residual stream (which makes a tied model repeat it).
                tied = model.llm.config.tie_word_embeddings
                tensor.copy_((0.1 if tied else 0.5) * torch.randn(tensor.shape, generator=generator))
            elif name.startswith("llm.") and name.endswith("_proj.weight") or "base_layer" in name:
                # Layers that move the residual stream as much as the embeddings do: a tied output layer
                # otherwise reads back the last input token and repeats it.
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5)


def build_model(spec: SalmSpec, llm_folder: Path) -> Any:
    """The SALM object, randomised, in eval mode."""
    import torch
    from nemo.collections.speechlm2.models import SALM

    torch.manual_seed(spec.seed)
    model = SALM(salm_config(spec, write_llm_folder(spec, llm_folder)))
    randomise(model, spec.seed)
    return model.eval()


def build(spec: SalmSpec, out: Path, llm_folder: Path | None = None) -> tuple[Path, Path]:
    """Save one tiny SALM as the Hub repo holds it (config.json + model.safetensors) into `out`, with its
    LLM folder beside it (`<out>-llm` unless given); returns both."""
    llm_folder = llm_folder or out.with_name(out.name + "-llm")
    model = build_model(spec, llm_folder)
    model.save_pretrained(str(out))
    return out, llm_folder


def set_pretrained_llm(folder: Path, value: str) -> None:
    """Point a saved checkpoint's `pretrained_llm` elsewhere (a Hub id, as the real config.json has)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["pretrained_llm"] = value
    path.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    variant = sys.argv[2] if len(sys.argv) > 2 else "salm-tied-r8"
    print("built", *build(VARIANTS[variant], target))
