"""Tiny Parakeet-style transducer checkpoints (RNNT, TDT and the hybrid with a CTC head) built with NeMo's own
classes: `EncDecRNNTBPEModel` (TDT when `model_defaults.tdt_durations` is set and the loss is `tdt`) and
`EncDecHybridRNNTCTCBPEModel`, a locally trained SentencePiece tokenizer, random weights, `save_to()`.

Every size differs from the real models and from each other; biases, norms and BatchNorm statistics are
randomised (factory.randomise) so a swapped or transposed tensor cannot hide. The RNNT/TDT loss needs numba
at construction, which NeMo installs.

Run as a script to build one checkpoint: `python tests/transducer_factory.py OUT.nemo [VARIANT]`.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import TEXT, pseudo_words, randomise

RNNT_BPE = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
HYBRID_BPE = "nemo.collections.asr.models.hybrid_rnnt_ctc_bpe_models.EncDecHybridRNNTCTCBPEModel"
# Sentences with punctuation, so word and segment timestamps (and TDT's punctuation rule) have work to do.
PUNCTUATED = ["The cat sat on the mat.", "One, two, three? Four!", "Hello world, this is a small test.",
              "Seven eight nine ten.", "A quick brown fox jumps over the lazy dog."]


@dataclass(frozen=True)
class TransducerSpec:
    """One tiny transducer; `durations` makes it TDT, `hybrid` adds NeMo's auxiliary CTC head."""

    name: str
    durations: tuple[int, ...] = ()
    hybrid: bool = False
    features: int = 80
    d_model: int = 48
    enc_layers: int = 2
    enc_heads: int = 4
    subsampling_factor: int = 8
    conv_channels: int = 8
    conv_kernel: int = 5
    ff_expansion: int = 2
    xscaling: bool = True
    pred_hidden: int = 40
    pred_layers: int = 1
    joint_hidden: int = 56
    vocab: int = 48
    pseudo_text: bool = False  # train the tokenizer on made-up words too: enough text for a real-size vocabulary
    dropout: float = 0.0  # NVIDIA's releases train with 0.2: the joint's output layer is then joint_net.2, not .1
    seed: int = 0


VARIANTS = {
    spec.name: spec
    for spec in (
        TransducerSpec("tdt-80", durations=(0, 1, 2, 3, 4), pred_layers=2, dropout=0.2, seed=11),
        TransducerSpec("rnnt-128", features=128, d_model=40, enc_heads=5, pred_hidden=32, joint_hidden=24,
                       subsampling_factor=4, vocab=40, seed=12),
        TransducerSpec("tdt-ctc-80", durations=(0, 1, 2, 3, 4), hybrid=True, d_model=36, enc_heads=3,
                       pred_hidden=48, joint_hidden=40, pred_layers=1, seed=13),
        TransducerSpec("rnnt-ctc-128", hybrid=True, features=128, pred_hidden=24, joint_hidden=32, pred_layers=2,
                       vocab=56, seed=14),
    )
}

# Widths the default group size (64) divides, so --quantize stores the LSTM, embedding and joint quantized.
QUANTIZABLE_VARIANTS = {
    spec.name: spec
    for spec in (
        TransducerSpec("tdt-ctc-w64", durations=(0, 1, 2, 3, 4), hybrid=True, d_model=64, pred_hidden=64,
                       joint_hidden=64, conv_channels=16, seed=15),
    )
}


def _train_tokenizer(spec: TransducerSpec, folder: Path) -> dict[str, Any]:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    corpus = folder / "text.txt"
    lines = (TEXT["en"] + PUNCTUATED) * 4
    if spec.pseudo_text:
        lines += pseudo_words("en", 4 * spec.vocab, spec.seed)
    corpus.write_text("\n".join(lines))
    create_spt_model(str(corpus), vocab_size=spec.vocab, sample_size=-1, do_lower_case=False,
                     output_dir=str(folder))
    return {"dir": str(folder), "type": "bpe"}


def nemo_config(spec: TransducerSpec, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """A model_config.yaml in the shape of NVIDIA's Parakeet checkpoints, with tiny sizes."""
    tdt = bool(spec.durations)
    config: dict[str, Any] = {
        "target": HYBRID_BPE if spec.hybrid else RNNT_BPE,
        "sample_rate": 16000,
        "model_defaults": {"enc_hidden": spec.d_model, "pred_hidden": spec.pred_hidden,
                           "joint_hidden": spec.joint_hidden,
                           **({"tdt_durations": list(spec.durations), "num_tdt_durations": len(spec.durations)}
                              if tdt else {})},
        "tokenizer": tokenizer,
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025,
                         "window_stride": 0.01, "window": "hann", "features": spec.features, "n_fft": 512,
                         "log": True, "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": spec.features,
                    "feat_out": -1, "n_layers": spec.enc_layers, "d_model": spec.d_model,
                    "subsampling": "dw_striding", "subsampling_factor": spec.subsampling_factor,
                    "subsampling_conv_channels": spec.conv_channels, "ff_expansion_factor": spec.ff_expansion,
                    "self_attention_model": "rel_pos", "n_heads": spec.enc_heads, "att_context_size": [-1, -1],
                    "xscaling": spec.xscaling, "untie_biases": True, "pos_emb_max_len": 5000,
                    "conv_kernel_size": spec.conv_kernel, "conv_norm_type": "batch_norm", "dropout": 0.0,
                    "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0},
        "decoder": {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
                    "random_state_sampling": False, "blank_as_pad": True,
                    "prednet": {"pred_hidden": spec.pred_hidden, "pred_rnn_layers": spec.pred_layers,
                                "t_max": None, "dropout": spec.dropout}},
        "joint": {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
                  "preserve_memory": False, "fuse_loss_wer": False, "fused_batch_size": 4,
                  "jointnet": {"joint_hidden": spec.joint_hidden, "activation": "relu", "dropout": spec.dropout},
                  **({"num_extra_outputs": len(spec.durations)} if tdt else {})},
        "decoding": {"strategy": "greedy_batch", **({"model_type": "tdt", "durations": list(spec.durations)}
                                                    if tdt else {}),
                     "greedy": {"max_symbols": 10}},
        "loss": ({"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0,
                                                     "durations": list(spec.durations), "sigma": 0.02,
                                                     "omega": 0.1}}
                 if tdt else {"loss_name": "default"}),
    }
    if spec.hybrid:
        config["aux_ctc"] = {"ctc_loss_weight": 0.3, "use_cer": False, "ctc_reduction": "mean_batch",
                             "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": None,
                                         "num_classes": -1, "vocabulary": []},
                             "decoding": {"strategy": "greedy_batch"}}
    return config


def _vary_decisions(model: Any, seed: int) -> None:
    """Random LSTM biases (NeMo initialises the forget gate's to 1 and the rest to 0, which would hide a swapped
    pair), and a joint whose decisions follow the input and the previous label: NeMo's small initial weights
    give a random model one label on every frame, which would test nothing."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.decoder.named_parameters():
            if "bias" in name:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
        model.joint.pred.weight.mul_(10.0)
        model.joint.enc.weight.mul_(4.0)
        # The joint's hidden units are ReLU outputs (all >= 0): output rows centred and of one norm score
        # what varies, not which row has the largest sum.
        out = model.joint.joint_net[-1]
        out.weight.sub_(out.weight.mean(dim=1, keepdim=True))
        out.weight.mul_(3.0 / out.weight.norm(dim=1, keepdim=True))
        out.bias.mul_(0.1)
        durations = getattr(model.joint, "num_extra_outputs", 0)
        if durations:
            out.weight[-durations:].mul_(3.0)  # durations that change with the input too


def build(spec: TransducerSpec, out: Path) -> Path:
    """Build, randomise and `save_to` one tiny transducer; returns the `.nemo` path."""
    import torch
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel, EncDecRNNTBPEModel

    torch.manual_seed(spec.seed)
    with tempfile.TemporaryDirectory(prefix="tiny-transducer-tok-") as scratch:
        config = nemo_config(spec, _train_tokenizer(spec, Path(scratch)))
        cls = EncDecHybridRNNTCTCBPEModel if spec.hybrid else EncDecRNNTBPEModel
        model = cls(OmegaConf.create(config))
        randomise(model, spec.seed)
        _vary_decisions(model, spec.seed)
        model.eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1])
    variant = sys.argv[2] if len(sys.argv) > 2 else "tdt-80"
    build({**VARIANTS, **QUANTIZABLE_VARIANTS}[variant], target)
    print(f"built {variant} -> {target}")
