"""Tiny Canary checkpoints built with NeMo's own classes, for tests and the interim demo.

Every size differs from the real models and from each other, so nothing hard-coded can pass. NeMo
initialises norms to 1/0, biases to 0 and BatchNorm statistics to 0/1, which would hide transposed or
swapped tensors; the factory randomises all of them.

Run as a script to build one checkpoint: `python tests/factory.py OUT.nemo [VARIANT]`.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

LANGS = ("en", "de")
TASK_TOKENS = ["<|transcribe|>", "<|translate|>", "<|startofcontext|>", "<|emo:undefined|>", "<|itn|>", "<|noitn|>",
               "<|timestamp|>", "<|notimestamp|>", "<|diarize|>", "<|nodiarize|>"]
TEXT = {
    "en": ["the cat sat on the mat", "one two three four five", "hello world this is a small test",
           "seven eight nine ten", "a quick brown fox jumps over the lazy dog"],
    "de": ["die katze sitzt auf der matte", "eins zwei drei vier fünf", "hallo welt das ist ein kleiner test",
           "sieben acht neun zehn", "ein schneller brauner fuchs springt"],
}


@dataclass(frozen=True)
class TinySpec:
    """One tiny architecture; defaults are deliberately unlike any real Canary."""

    name: str
    prompt_format: str = "canary"  # canary | canary2
    tokenizer: str = "agg"  # agg (aggregate, canary-1b/flash) | bpe (one model, canary-1b-v2)
    features: int = 20
    d_model: int = 48
    dec_hidden: int = 48  # != d_model adds encoder_decoder_proj
    enc_layers: int = 2
    dec_layers: int = 2
    enc_heads: int = 4
    dec_heads: int = 2
    subsampling_factor: int = 8
    conv_channels: int = 8
    conv_kernel: int = 5
    ff_expansion: int = 2
    xscaling: bool = False
    untie_biases: bool = True
    max_sequence_length: int = 64
    seed: int = 0
    frame_tokens: int = 0  # canary2 flash models' timestamp tokens <|0|> .. <|N-1|> in spl_tokens
    prompt_defaults: list[dict[str, Any]] | None = None  # NeMo's prompt_defaults (role/slots turns), when set
    dec_inner_factor: int = 3  # decoder feed-forward width / hidden (real Canary: 4)
    text_vocab: int = 0  # text pieces per SentencePiece model (0: a few dozen, from TEXT alone)
    punctuation: bool = False  # train on PUNCTUATED sentences too (English), so `.` `,` `?` `!` are pieces
    # The decoder's feed-forward outputs times this. A random decoder's output is near the embedding of the
    # token it was fed (the head is tied to the embedding), so it repeats one token; scaled up, the next token
    # is a random function of the last, and the text varies (words, punctuation, segments).
    ffn_scale: float = 1.0


VARIANTS = {
    spec.name: spec
    for spec in (
        TinySpec("canary-sub8"),
        TinySpec("canary2-proj-sub4", prompt_format="canary2", d_model=40, dec_hidden=32, enc_heads=5,
                 subsampling_factor=4, features=24, conv_kernel=7, dec_heads=4, seed=1),
        TinySpec("canary2-bpe-sub16", prompt_format="canary2", tokenizer="bpe", d_model=36, dec_hidden=36,
                 enc_heads=3, dec_heads=3, subsampling_factor=16, conv_channels=6, xscaling=True,
                 untie_biases=False, enc_layers=3, dec_layers=1, seed=2),
    )
}


# Widths the default group size (64) divides, so --quantize stores every Linear and Embedding quantized;
# canary-1b-v2's single BPE tokenizer and canary2 prompt, the kind mlx-audio serves; with and without the
# encoder->decoder projection.
QUANTIZABLE_VARIANTS = {
    spec.name: spec
    for spec in (
        TinySpec("canary2-bpe-w64", prompt_format="canary2", tokenizer="bpe", features=32, d_model=64, dec_hidden=64,
                 enc_heads=4, dec_heads=4, conv_channels=16, seed=3),
        TinySpec("canary2-bpe-proj-w64", prompt_format="canary2", tokenizer="bpe", features=32, d_model=64,
                 dec_hidden=128, enc_heads=2, dec_heads=4, conv_channels=16, subsampling_factor=4, seed=4),
    )
}


def pseudo_words(lang: str, lines: int, seed: int) -> list[str]:
    """Seeded lines of made-up words: enough distinct text for a SentencePiece vocabulary of real size."""
    import random

    rng = random.Random(f"{seed}-{lang}")
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiouy"
    syllables = [c + v for c in consonants for v in vowels] + [v + c for v in vowels for c in consonants]
    return [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(6, 14)))
            for _ in range(lines)]


def _corpus(spec: TinySpec, lang: str) -> list[str]:
    punctuated = PUNCTUATED * 4 if spec.punctuation and lang == "en" else []
    if not spec.text_vocab:
        return TEXT[lang] * 4 + punctuated
    return TEXT[lang] * 4 + punctuated + pseudo_words(lang, 4 * spec.text_vocab, spec.seed)


def _train_tokenizers(spec: TinySpec, folder: Path) -> dict[str, Any]:
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    lang_tokens = [f"<|{lang}|>" for lang in LANGS] + [f"<|{frame}|>" for frame in range(spec.frame_tokens)]
    if spec.tokenizer == "bpe":
        # canary-1b-v2 style: one SentencePiece model holds the special tokens and the text of every language.
        from nemo.collections.common.tokenizers.canary_tokenizer import DEFAULT_TOKENS

        corpus = folder / "bpe" / "text.txt"
        corpus.parent.mkdir(parents=True)
        corpus.write_text("\n".join(line for lang in LANGS for line in _corpus(spec, lang)))
        specials = list(dict.fromkeys(DEFAULT_TOKENS + TASK_TOKENS + lang_tokens))
        create_spt_model(str(corpus), vocab_size=len(specials) + (spec.text_vocab or 60), sample_size=-1,
                         do_lower_case=False, output_dir=str(corpus.parent), user_defined_symbols=specials)
        return {"type": "bpe", "dir": str(corpus.parent),
                "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryBPETokenizer"}}
    CanaryTokenizer.build_special_tokenizer(TASK_TOKENS + lang_tokens, folder / "spl_tokens", force_rebuild=True)
    langs: dict[str, Any] = {"spl_tokens": {"dir": str(folder / "spl_tokens"), "type": "bpe"}}
    for index, lang in enumerate(LANGS):
        corpus = folder / lang / "text.txt"
        corpus.parent.mkdir(parents=True)
        corpus.write_text("\n".join(_corpus(spec, lang)))
        create_spt_model(str(corpus), vocab_size=spec.text_vocab or 30 + 7 * index, sample_size=-1, do_lower_case=False,
                         output_dir=str(corpus.parent))
        langs[lang] = {"dir": str(corpus.parent), "type": "bpe"}
    return {"type": "agg", "dir": None, "langs": langs,
            "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer"}}


def preprocessor_config(spec: TinySpec) -> dict[str, Any]:
    """NeMo's mel front end at the spec's feature count (every FastConformer family shares it)."""
    return {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025,
            "window_stride": 0.01, "window": "hann", "features": spec.features, "n_fft": 512,
            "log": True, "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0}


def encoder_config(spec: TinySpec) -> dict[str, Any]:
    """A tiny FastConformer (ConformerEncoder, dw_striding, rel_pos) at the spec's sizes."""
    return {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": spec.features,
            "feat_out": -1, "n_layers": spec.enc_layers, "d_model": spec.d_model,
            "subsampling": "dw_striding", "subsampling_factor": spec.subsampling_factor,
            "subsampling_conv_channels": spec.conv_channels, "ff_expansion_factor": spec.ff_expansion,
            "self_attention_model": "rel_pos", "n_heads": spec.enc_heads, "xscaling": spec.xscaling,
            "untie_biases": spec.untie_biases, "pos_emb_max_len": 5000,
            "conv_kernel_size": spec.conv_kernel, "conv_norm_type": "batch_norm", "dropout": 0.0,
            "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0}


def nemo_config(spec: TinySpec, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """A model_config.yaml in the shape NVIDIA's Canary checkpoints use, with tiny sizes."""
    return {
        "sample_rate": 16000,
        "prompt_format": spec.prompt_format,
        # NeMo's restore path for canary-1b-v2's timestamp model reads process-global state left by an
        # earlier restore_from; tiny models have no timestamp model.
        "restore_timestamps_model": False,
        "model_defaults": {"asr_enc_hidden": spec.d_model, "lm_enc_hidden": spec.dec_hidden,
                           "lm_dec_hidden": spec.dec_hidden},
        "tokenizer": tokenizer,
        "preprocessor": preprocessor_config(spec),
        "encoder": encoder_config(spec),
        "transf_decoder": {"_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
                           "model_name": None, "pretrained": False, "encoder": None,
                           "pre_ln_final_layer_norm": True,
                           "config_dict": {"max_sequence_length": spec.max_sequence_length, "num_token_types": 0,
                                           "embedding_dropout": 0.0, "learn_positional_encodings": False,
                                           "hidden_size": spec.dec_hidden, "inner_size": spec.dec_inner_factor * spec.dec_hidden,
                                           "num_layers": spec.dec_layers, "num_attention_heads": spec.dec_heads,
                                           "ffn_dropout": 0.0, "attn_score_dropout": 0.0,
                                           "attn_layer_dropout": 0.0, "hidden_act": "relu", "pre_ln": True,
                                           "vocab_size": None}},
        "head": {"_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
                 "num_layers": 1, "activation": "relu", "log_softmax": True, "hidden_size": spec.dec_hidden,
                 "num_classes": None, "dropout": 0.0, "use_transformer_init": True},
        **({"prompt_defaults": spec.prompt_defaults} if spec.prompt_defaults else {}),
        "decoding": {"strategy": "beam", "beam": {"beam_size": 1, "length_penalty": 0.5, "max_generation_delta": 20},
                     "greedy": {"max_generation_delta": 15}},
        "loss": {"_target_": "nemo.collections.common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
                 "label_smoothing": 0.0, "pad_id": None},
    }


def randomise(model: Any, seed: int) -> None:
    """Give every norm, bias, positional bias and BatchNorm statistic a distinct random value."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "preprocessor." in name or "position_embedding" in name or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("bias", "running_mean", "pos_bias_u", "pos_bias_v")):
                tensor.copy_(0.1 * noise)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.num_batches_tracked.fill_(1234)


def build(spec: TinySpec, out: Path) -> Path:
    """Build, randomise and `save_to` one tiny EncDecMultiTaskModel; returns the `.nemo` path."""
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecMultiTaskModel

    torch.manual_seed(spec.seed)
    with tempfile.TemporaryDirectory(prefix="tiny-canary-tok-") as scratch:
        config = nemo_config(spec, _train_tokenizers(spec, Path(scratch)))
        model = EncDecMultiTaskModel(OmegaConf.create(config))
        randomise(model, spec.seed)
        with torch.no_grad():
            for name, parameter in model.transf_decoder.named_parameters():
                if "third_sub_layer.dense_out." in name:
                    parameter.mul_(spec.ffn_scale)
        model.eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
    return out


@dataclass(frozen=True)
class TinyCTCSpec:
    """A tiny EncDecCTCModelBPE (FastConformer + 1x1 conv CTC head) with its own SentencePiece BPE tokenizer."""

    name: str
    features: int = 24
    d_model: int = 40
    enc_layers: int = 2
    enc_heads: int = 4
    subsampling_factor: int = 4
    conv_channels: int = 8
    conv_kernel: int = 5
    ff_expansion: int = 2
    xscaling: bool = True
    untie_biases: bool = True
    vocab: int = 48  # SentencePiece pieces; the CTC head has one more class, the blank
    text: tuple[str, ...] = ("en",)
    seed: int = 10
    punctuation: bool = False  # train on punctuated sentences too, so `.` `,` `?` `!` are pieces of their own


CTC_VARIANTS = {
    spec.name: spec
    for spec in (
        TinyCTCSpec("ctc-sub4"),
        TinyCTCSpec("ctc-sub8-w64", features=32, d_model=64, enc_heads=2, subsampling_factor=8, conv_channels=16,
                    xscaling=False, untie_biases=False, vocab=40, seed=11),
    )
}
# canary-1b-v2's aligner in miniature: its own tokenizer (unlike the Canary's), punctuation pieces, another
# feature count and subsampling than the Canary it rides with.
ALIGNER = TinyCTCSpec("aligner-sub4", features=28, d_model=32, enc_heads=2, subsampling_factor=4, vocab=56,
                      punctuation=True, seed=12)
PUNCTUATED = ["Hello, world. This is a test!", "Is the cat on the mat? Yes.", "One, two, three. Four five six!"]
# A tiny canary-1b-v2-style Canary whose random decoder writes varied text (words, `.` and `!` then a space:
# segments, prompt tokens) instead of one token again and again, and an aligner in its likeness: the Canary's
# own tokenizer and frame length (subsampling 8), as the release's aligner has them.
CHATTY = TinySpec("canary2-bpe-chatty-sub8", prompt_format="canary2", tokenizer="bpe", d_model=36, dec_hidden=36,
                  enc_heads=3, dec_heads=3, conv_channels=6, punctuation=True, ffn_scale=30.0, seed=13)
SHARED_ALIGNER = TinyCTCSpec("aligner-shared-sub8", features=28, d_model=32, enc_heads=2, subsampling_factor=8,
                             seed=13)


def ctc_nemo_config(spec: TinyCTCSpec, tokenizer_dir: str) -> dict[str, Any]:
    """A model_config.yaml in the shape of NeMo's FastConformer CTC BPE models (parakeet-ctc), tiny sizes."""
    base = nemo_config(TinySpec("ctc", features=spec.features, d_model=spec.d_model, enc_layers=spec.enc_layers,
                                enc_heads=spec.enc_heads, subsampling_factor=spec.subsampling_factor,
                                conv_channels=spec.conv_channels, conv_kernel=spec.conv_kernel,
                                ff_expansion=spec.ff_expansion, xscaling=spec.xscaling,
                                untie_biases=spec.untie_biases), {})
    return {
        "sample_rate": 16000,
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": base["preprocessor"],
        "encoder": base["encoder"],
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": spec.d_model,
                    "num_classes": -1, "vocabulary": []},
        "decoding": {"strategy": "greedy_batch"},
    }


def canary_tokenizer(canary: Path, folder: Path) -> Path:
    """The SentencePiece model of a canary-1b-v2-style `.nemo` (one BPE model, special tokens included),
    extracted into `folder` under the plain names a tokenizer `dir` expects; returns `folder`."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(canary) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            # Members are uuid-prefixed: "<hex>_tokenizer.model", "<hex>_vocab.txt", "<hex>_tokenizer.vocab".
            plain = name.split("_", 1)[-1]
            if member.isfile() and plain in ("tokenizer.model", "vocab.txt", "tokenizer.vocab"):
                (folder / plain).write_bytes(tar.extractfile(member).read())
    if not (folder / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{canary} holds no single tokenizer.model (an aggregate tokenizer?)")
    return folder


def build_ctc(spec: TinyCTCSpec, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """Build, randomise and `save_to` one tiny EncDecCTCModelBPE; returns the `.nemo` path. Its tokenizer is
    trained from the spec's text, or, with `tokenizer_dir`, that SentencePiece model (e.g. a Canary's own)."""
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    torch.manual_seed(spec.seed)
    with tempfile.TemporaryDirectory(prefix="tiny-ctc-tok-") as scratch:
        if tokenizer_dir is None:
            corpus = Path(scratch) / "text.txt"
            lines = [line for lang in spec.text for line in TEXT[lang] * 4] + (PUNCTUATED * 4 if spec.punctuation else [])
            corpus.write_text("\n".join(lines))
            create_spt_model(str(corpus), vocab_size=spec.vocab, sample_size=-1, do_lower_case=False,
                             output_dir=scratch)
        model = EncDecCTCModelBPE(OmegaConf.create(ctc_nemo_config(spec, str(tokenizer_dir or scratch))))
        randomise(model, spec.seed)
        with torch.no_grad():
            # A spread-out head, so greedy decoding emits many tokens from random weights, not blanks only.
            model.decoder.decoder_layers[0].weight.mul_(8.0)
        model.eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
    return out


def with_aligner(canary: Path, aligner: Path, out: Path) -> Path:
    """A copy of a tiny canary-1b-v2-style `.nemo` carrying a CTC aligner as the release does: the aligner's
    config and weights as `timestamps_asr_model_config.yaml` / `_weights.ckpt` and its tokenizer files (their
    uuid-prefixed names, which its config refers to) beside the Canary's own members, with
    `restore_timestamps_model` left at NeMo's default (true). NeMo's save_to would drop the aligner."""
    import tarfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="tiny-canary-aligner-") as scratch:
        folder = Path(scratch) / "nemo"
        folder.mkdir()
        with tarfile.open(canary) as tar:
            tar.extractall(folder, filter="data")
        with tarfile.open(aligner) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile():
                    continue
                renamed = {"model_config.yaml": "timestamps_asr_model_config.yaml",
                           "model_weights.ckpt": "timestamps_asr_model_weights.ckpt"}.get(name, name)
                (folder / renamed).write_bytes(tar.extractfile(member).read())
        config = yaml.safe_load((folder / "model_config.yaml").read_text())
        config.pop("restore_timestamps_model")
        (folder / "model_config.yaml").write_text(yaml.safe_dump(config))
        with tarfile.open(out, "w:") as tar:  # NeMo's own .nemo layout: an uncompressed tar of "./" members
            tar.add(folder, arcname=".")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1])
    variant = sys.argv[2] if len(sys.argv) > 2 else "canary-sub8"
    build(replace({**VARIANTS, **QUANTIZABLE_VARIANTS}[variant]), target)
    print(f"built {variant} -> {target}")
