"""Train the project's example Parakeet: a tiny hybrid TDT-CTC model (NeMo's `EncDecHybridRNNTCTCBPEModel` with
TDT durations 0-4) on the example's espeak-ng speech, so quantized conversions can be checked on a model whose
decisions are confident rather than the near-ties of random weights.

The encoder and front end are the example Canary's, already trained on the same clips (`examples/tiny-canary`),
copied and frozen. Only the heads are trained: the prediction network, the TDT joint and the auxiliary CTC head,
on the frozen encoder's states (computed once), with a TDT loss (written here: NeMo 3.0 has TDT losses for CUDA
only) and torch's CTC loss. Same clips and seed as the Canary (`train_tiny_canary.synthesise`), English and German
digit strings, lower case without punctuation, one SentencePiece vocabulary for both languages. Seeded, on one
thread (tiny ops on 2 shared cores ran 15 times slower on two); about 3 minutes on 2 CPU cores.

    python examples/train_tiny_parakeet.py examples/tiny-parakeet
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

from train_tiny_canary import WORDS, Clip, synthesise  # noqa: E402
from transducer_factory import TransducerSpec, nemo_config  # noqa: E402
from wer import word_error_rate  # noqa: E402

CANARY = REPO / "examples" / "tiny-canary" / "tiny-canary.nemo"
# Heads sized so the default group size (64) divides every quantizable width: the LSTM, embedding, joint and CTC
# classifier are all stored quantized by `--quantize 8`.
HEADS = TransducerSpec("tiny-parakeet", durations=(0, 1, 2, 3, 4), hybrid=True, features=64, d_model=128,
                       pred_hidden=64, pred_layers=1, joint_hidden=64, vocab=40)
CTC_WEIGHT = 0.3  # NeMo's aux_ctc.ctc_loss_weight in Parakeet's hybrid recipes
SIGMA = 0.02  # TDT's logit under-normalisation (NeMo's loss.tdt_kwargs.sigma)
NEG = -1e4  # log(0) stand-in that keeps gradients finite


def train_tokenizer(folder: Path, clips: list[Clip]) -> dict[str, Any]:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    corpus = folder / "text.txt"
    corpus.write_text("\n".join(clip.plain for clip in clips))
    create_spt_model(str(corpus), vocab_size=HEADS.vocab, sample_size=-1, do_lower_case=False,
                     output_dir=str(folder))
    return {"dir": str(folder), "type": "bpe"}


def build_model(tokenizer: dict[str, Any]):
    """The hybrid with the Canary's front end and encoder (config and weights)."""
    import torch
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel, EncDecMultiTaskModel
    from omegaconf import OmegaConf

    canary = EncDecMultiTaskModel.restore_from(str(CANARY), map_location="cpu")
    config = nemo_config(HEADS, tokenizer)
    config["preprocessor"] = OmegaConf.to_container(canary.cfg.preprocessor)
    config["encoder"] = OmegaConf.to_container(canary.cfg.encoder)
    torch.manual_seed(HEADS.seed)
    model = EncDecHybridRNNTCTCBPEModel(OmegaConf.create(config))
    model.encoder.load_state_dict(canary.encoder.state_dict())
    model.preprocessor.load_state_dict(canary.preprocessor.state_dict())
    model.eval()
    return model


def encode_all(model, clips: list[Clip], batch: int = 16) -> list[Any]:
    """The frozen encoder's states of every clip, [T, D] each (eval mode: no dropout, BatchNorm's statistics)."""
    import torch

    states = []
    with torch.no_grad():
        for start in range(0, len(clips), batch):
            group = clips[start:start + batch]
            lengths = torch.tensor([clip.audio.size for clip in group])
            audio = torch.zeros(len(group), int(lengths.max()))
            for row, clip in enumerate(group):
                audio[row, :clip.audio.size] = torch.from_numpy(clip.audio)
            features, frames = model.preprocessor(input_signal=audio, length=lengths)
            encoded, encoded_lengths = model.encoder(audio_signal=features, length=frames)
            states += [encoded[row, :, :length].T.clone() for row, length in enumerate(encoded_lengths.tolist())]
    return states


def tdt_loss(logits, labels, frames, label_lengths, durations: tuple[int, ...], blank: int):
    """Negative log-likelihood of each label sequence under TDT (Xu et al. 2023, eq. 7), per token.

    logits [B, T, U+1, V+1+D]. alpha[t, u]: log-probability of having emitted u labels and reached frame t. A
    blank of duration d >= 1 moves (t, u) -> (t+d, u); a label of duration d >= 0 moves (t, u) -> (t+d, u+1). The
    same-frame moves (d = 0) are a recurrence along u, solved in closed form with a cumulative log-sum-exp.
    """
    import torch

    count = len(durations)
    tokens = torch.log_softmax(logits[..., :-count], dim=-1) - SIGMA
    spans = torch.log_softmax(logits[..., -count:], dim=-1)
    batch, steps, width, _ = logits.shape
    blank_lp = tokens[..., blank]  # [B, T, U+1]
    emit_lp = tokens[:, :, :-1].gather(-1, labels[:, None, :, None].expand(batch, steps, width - 1, 1))[..., 0]
    # Every move out of (t, u) with duration index n, its log-probability: [B, T, U+1, D] and [B, T, U, D].
    leave_blank = blank_lp[..., None] + spans
    leave_label = emit_lp[..., None] + spans[:, :, :-1]
    jumps = [n for n, d in enumerate(durations) if d > 0]
    same_frame = durations.index(0) if 0 in durations else None
    floor = torch.full((batch, 1), NEG)
    alphas: list[Any] = []
    for t in range(steps):
        usable = [n for n in jumps if t - durations[n] >= 0]
        if usable:
            sources = torch.stack([alphas[t - durations[n]] for n in usable], dim=1)  # [B, k, U+1]
            origins = [t - durations[n] for n in usable]
            # Two index lists around a slice: torch puts their axis first, [k, B, U+1].
            by_blank = sources + leave_blank[:, origins, :, usable].transpose(0, 1)
            by_label = sources[:, :, :-1] + leave_label[:, origins, :, usable].transpose(0, 1)
            arrivals = torch.cat([by_blank, torch.cat([floor[:, None].expand(-1, len(usable), 1), by_label], 2)], 1)
            base = torch.logsumexp(arrivals, dim=1)
        else:
            base = torch.cat([torch.zeros(batch, 1), torch.full((batch, width - 1), NEG)], dim=1)
        if same_frame is not None:
            # alpha[u] = logaddexp(base[u], alpha[u-1] + w[u]): alpha[u] = c[u] + logcumsumexp(base - c)[u].
            c = torch.cat([torch.zeros(batch, 1), torch.cumsum(leave_label[:, t, :, same_frame], dim=1)], dim=1)
            base = c + torch.logcumsumexp(base - c, dim=1)
        alphas.append(base)
    alpha = torch.stack(alphas, dim=1)  # [B, T, U+1]
    rows = torch.arange(batch)
    ends = []
    for n in jumps:
        start = frames - durations[n]
        term = alpha[rows, start.clamp(min=0), label_lengths] + leave_blank[rows, start.clamp(min=0), label_lengths, n]
        ends.append(torch.where(start >= 0, term, torch.full_like(term, NEG)))
    return -torch.logsumexp(torch.stack(ends), dim=0) / (label_lengths + 1)


def train(model, states: list[Any], clips: list[Clip], steps: int, seed: int, batch: int = 16) -> list[float]:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    heads = [*model.decoder.parameters(), *model.joint.parameters(), *model.ctc_decoder.parameters()]
    optimiser = torch.optim.AdamW(heads, lr=3e-3, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    targets = [model.tokenizer.text_to_ids(clip.plain) for clip in clips]
    blank = model.decoder.blank_idx
    model.decoder.train()
    model.joint.train()
    model.ctc_decoder.train()
    started, smoothed, history = time.monotonic(), None, []
    for step in range(1, steps + 1):
        chosen = rng.sample(range(len(clips)), batch)
        frames = torch.tensor([states[i].shape[0] for i in chosen])
        label_lengths = torch.tensor([len(targets[i]) for i in chosen])
        encoded = torch.zeros(batch, int(frames.max()), states[0].shape[1])
        labels = torch.full((batch, int(label_lengths.max())), blank)
        for row, i in enumerate(chosen):
            encoded[row, :frames[row]] = states[i]
            labels[row, :label_lengths[row]] = torch.tensor(targets[i])
        predicted, *_ = model.decoder(targets=labels, target_length=label_lengths)  # [B, H, U+1]
        joint = model.joint
        hidden = joint.project_encoder(encoded)[:, :, None] + joint.project_prednet(predicted.transpose(1, 2))[:, None]
        transducer = tdt_loss(joint.joint_net(hidden), labels, frames, label_lengths, HEADS.durations, blank).mean()
        ctc_lp = model.ctc_decoder(encoder_output=encoded.transpose(1, 2))  # [B, T, V+1], log-probs
        ctc = torch.nn.functional.ctc_loss(ctc_lp.transpose(0, 1), labels, frames, label_lengths, blank=blank,
                                           reduction="none", zero_infinity=True)
        loss = (1 - CTC_WEIGHT) * transducer + CTC_WEIGHT * (ctc / label_lengths).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads, 1.0)
        optimiser.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 50 == 0:
            history.append(round(smoothed, 4))
            print(f"step {step}: loss {smoothed:.4f} (tdt {transducer.item():.4f}, ctc/token "
                  f"{(ctc / label_lengths).mean().item():.4f}), {time.monotonic() - started:.0f}s", flush=True)
    model.eval()
    print(f"trained {steps} steps in {(time.monotonic() - started) / 60:.1f} min")
    return history


def evaluate(model, name: str, clips: list[Clip]) -> dict[str, float]:
    """NeMo's own transcribe() on the clips, with each head, per language."""
    scores = {}
    for head in ("rnnt", "ctc"):
        model.change_decoding_strategy(decoder_type=head, verbose=False)
        for lang in WORDS:
            subset = [clip for clip in clips if clip.lang == lang]
            hypotheses = model.transcribe([clip.audio for clip in subset], batch_size=8, verbose=False)
            refs = [clip.plain for clip in subset]
            scores[f"{lang}-{'tdt' if head == 'rnnt' else 'ctc'}"] = word_error_rate(refs, [h.text for h in hypotheses])
    model.change_decoding_strategy(decoder_type="rnnt", verbose=False)
    model.eval()
    print(f"{name}: " + ", ".join(f"{key} WER {value:.1%}" for key, value in scores.items()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: apt-get install espeak-ng")
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    train_clips, unseen_text, unseen_voice = synthesise(args.seed)
    print(f"synthesised {len(train_clips)} training clips in {time.monotonic() - started:.0f}s")
    with tempfile.TemporaryDirectory(prefix="tiny-parakeet-tokenizer-") as scratch:
        model = build_model(train_tokenizer(Path(scratch), train_clips))
        states = encode_all(model, train_clips)
        print(f"encoded {len(states)} clips in {time.monotonic() - started:.0f}s")
        history = train(model, states, train_clips, args.steps, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_to(str(args.out / "tiny-parakeet.nemo"))
    scores = {
        "train": evaluate(model, "training sentences", train_clips[:: max(1, len(train_clips) // 48)]),
        "held_out_sentences": evaluate(model, "held-out sentences", unseen_text),
        "held_out_voices": evaluate(model, "held-out voices", unseen_voice),
    }
    (args.out / "training.json").write_text(json.dumps(
        {"seed": args.seed, "steps": args.steps, "minutes": round((time.monotonic() - started) / 60, 1),
         "loss_every_50_steps": history, "wer_nemo": scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
