"""Train the project's example Canary: a small EncDecMultiTaskModel on espeak-ng speech, with NeMo's classes.

Seeded and repeatable; about 25 minutes on 2 CPU cores. English and German spoken digit strings (two to
four words a clip, several voices, speeds and pitches, light noise), every clip labelled twice: with
punctuation and capitals (`pnc` on) and without. Held-out sentences and held-out voices measure
generalisation. Writes the `.nemo`, a handful of 16 kHz WAV clips and their reference texts.

    python examples/train_tiny_canary.py examples/tiny-canary --minutes 24
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "examples"))

from factory import TinySpec, nemo_config  # noqa: E402
from wer import word_error_rate  # noqa: E402

SAMPLE_RATE = 16000
WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
}
# espeak-ng voices (language + variant); the held-out ones are never heard in training.
TRAIN_VOICES = {"en": ["en-us", "en-us+m3", "en-gb+f2", "en-gb+m7"], "de": ["de", "de+m3", "de+f2", "de+m7"]}
HELD_OUT_VOICES = {"en": ["en-gb-scotland+f4"], "de": ["de+f4"]}
SENTENCES_PER_LANGUAGE = 300
HELD_OUT_SENTENCES = 12

ARCHITECTURE = TinySpec(
    "example", prompt_format="canary", features=64, d_model=128, dec_hidden=128, enc_layers=4, dec_layers=2,
    enc_heads=4, dec_heads=4, subsampling_factor=4, conv_channels=64, conv_kernel=9, ff_expansion=4,
    max_sequence_length=128,
)


@dataclass(frozen=True)
class Clip:
    lang: str
    words: tuple[str, ...]
    voice: str
    audio: np.ndarray

    @property
    def plain(self) -> str:
        return " ".join(self.words)

    @property
    def punctuated(self) -> str:
        text = ", ".join(self.words) + "."
        return text[0].upper() + text[1:]


def speak(text: str, voice: str, speed: int, pitch: int, rng: np.random.Generator) -> np.ndarray:
    """espeak-ng at 22.05 kHz -> 16 kHz float32 with a little noise (about 35 dB below the speech)."""
    wav = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
                         check=True, capture_output=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    noise = rng.standard_normal(samples.size).astype(np.float32)
    return samples + noise * (np.sqrt(np.mean(samples**2)) * 10 ** (-35 / 20))


def sentences(lang: str, rng: random.Random, count: int) -> list[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    while len(found) < count:
        found.add(tuple(rng.choice(WORDS[lang]) for _ in range(rng.randint(2, 4))))
    return sorted(found)


def synthesise(seed: int) -> tuple[list[Clip], list[Clip], list[Clip]]:
    """Training clips, held-out-sentence clips (training voices) and held-out-voice clips."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    train, unseen_text, unseen_voice = [], [], []
    for lang in WORDS:
        pool = sentences(lang, rng, SENTENCES_PER_LANGUAGE + HELD_OUT_SENTENCES)
        rng.shuffle(pool)
        held, seen = pool[:HELD_OUT_SENTENCES], pool[HELD_OUT_SENTENCES:]
        for words in seen:
            for voice in rng.sample(TRAIN_VOICES[lang], 2):
                audio = speak(" ".join(words), voice, rng.randint(130, 200), rng.randint(30, 70), noise)
                train.append(Clip(lang, words, voice, audio))
        for words in held:
            voice = rng.choice(TRAIN_VOICES[lang])
            unseen_text.append(Clip(lang, words, voice, speak(" ".join(words), voice, 160, 50, noise)))
            voice = rng.choice(HELD_OUT_VOICES[lang])
            unseen_voice.append(Clip(lang, words, voice, speak(" ".join(words), voice, 160, 50, noise)))
    return train, unseen_text, unseen_voice


def train_tokenizers(folder: Path, clips: list[Clip]) -> dict:
    """Canary's aggregate tokenizer: the special tokens, then one small SentencePiece model per language."""
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    CanaryTokenizer.build_special_tokenizer(["<|transcribe|>", "<|translate|>", "<|en|>", "<|de|>"],
                                            folder / "spl_tokens", force_rebuild=True)
    langs = {"spl_tokens": {"dir": str(folder / "spl_tokens"), "type": "bpe"}}
    for lang in WORDS:
        corpus = folder / lang / "text.txt"
        corpus.parent.mkdir(parents=True)
        corpus.write_text("\n".join(t for c in clips if c.lang == lang for t in (c.plain, c.punctuated)))
        create_spt_model(str(corpus), vocab_size=48, sample_size=-1, do_lower_case=False, output_dir=str(corpus.parent))
        langs[lang] = {"dir": str(corpus.parent), "type": "bpe"}
    return {"type": "agg", "dir": None, "langs": langs,
            "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer"}}


def build_model(tokenizer: dict):
    import torch
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from omegaconf import OmegaConf

    config = nemo_config(ARCHITECTURE, tokenizer)
    config["preprocessor"]["dither"] = 0.0
    config["decoding"] = {"strategy": "beam", "beam": {"beam_size": 1, "length_penalty": 0.0, "max_generation_delta": 50}}
    for key in ("dropout", "dropout_pre_encoder", "dropout_emb"):
        config["encoder"][key] = 0.1
    config["transf_decoder"]["config_dict"].update(ffn_dropout=0.1, attn_layer_dropout=0.1, embedding_dropout=0.1)
    torch.manual_seed(0)
    return EncDecMultiTaskModel(OmegaConf.create(config))


def targets(model, clip: Clip, pnc: bool) -> tuple[list[int], list[bool]]:
    """Prompt + answer ids and the answer mask, from the model's own prompt formatter."""
    turns = [
        {"role": "user", "slots": {"source_lang": clip.lang, "target_lang": clip.lang, "task": "asr",
                                   "pnc": "yes" if pnc else "no", "prompt_language": "spl_tokens"}},
        {"role": "assistant", "slots": {"text": clip.punctuated if pnc else clip.plain, "prompt_language": clip.lang}},
    ]
    encoded = model.prompt.encode_dialog(turns=turns)
    return encoded["input_ids"].tolist(), encoded["mask"].tolist()


def train(model, clips: list[Clip], minutes: float, seed: int, batch: int = 16) -> None:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = random.Random(seed)
    examples = [(clip, pnc, *targets(model, clip, pnc)) for clip in clips for pnc in (True, False)]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3)
    warmup, steps = 400, int(minutes * 60 / 0.2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))) + 1e-3
    )
    model.train()
    started, step, smoothed = time.monotonic(), 0, None
    pad = model.tokenizer.pad_id
    while time.monotonic() - started < minutes * 60 and step < steps:
        chosen = rng.sample(examples, batch)
        lengths = torch.tensor([c.audio.size for c, *_ in chosen])
        audio = torch.zeros(batch, int(lengths.max()))
        for row, (clip, *_rest) in enumerate(chosen):
            audio[row, : clip.audio.size] = torch.from_numpy(clip.audio)
        width = max(len(ids) for *_x, ids, _m in chosen)
        ids = torch.full((batch, width), pad)
        mask = torch.zeros(batch, width, dtype=torch.bool)
        for row, (*_x, row_ids, row_mask) in enumerate(chosen):
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            mask[row, : len(row_mask)] = torch.tensor(row_mask)
        token_lengths = torch.tensor([len(row_ids) - 1 for *_x, row_ids, _m in chosen])
        log_probs, *_ = model(input_signal=audio, input_signal_length=lengths,
                              transcript=ids[:, :-1], transcript_length=token_lengths)
        scored = mask[:, 1:]
        loss = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)[scored].mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        step += 1
        if step % 200 == 0:
            print(f"step {step}: loss {smoothed:.4f}, {time.monotonic() - started:.0f}s", flush=True)
    model.eval()
    print(f"trained {step} steps in {(time.monotonic() - started) / 60:.1f} min, final loss {smoothed:.4f}")


def evaluate(model, name: str, clips: list[Clip]) -> dict[str, float]:
    """NeMo's own transcribe() on the clips, pnc on and off, per language."""
    scores = {}
    for pnc in (True, False):
        for lang in WORDS:
            subset = [c for c in clips if c.lang == lang]
            hyps = model.transcribe([c.audio for c in subset], batch_size=4, verbose=False, source_lang=lang,
                                    target_lang=lang, task="transcribe", pnc="yes" if pnc else "no")
            refs = [c.punctuated if pnc else c.plain for c in subset]
            scores[f"{lang}-{'pnc' if pnc else 'nopnc'}"] = word_error_rate(refs, [h.text for h in hyps])
    print(f"{name}: " + ", ".join(f"{key} WER {value:.1%}" for key, value in scores.items()))
    return scores


def write_clips(model, out: Path, train_clips: list[Clip], unseen_text: list[Clip], unseen_voice: list[Clip]) -> None:
    """A handful of clips as 16-bit WAV, with references and NeMo's own transcripts of the written files."""
    clips_dir = out / "clips"
    shutil.rmtree(clips_dir, ignore_errors=True)
    clips_dir.mkdir(parents=True)
    first_of_each = [clip for lang in WORDS for clip in [c for c in train_clips if c.lang == lang][:2]]
    records = []
    for kind, group in (("train", first_of_each), ("heldout-text", unseen_text[::6]),
                        ("heldout-voice", unseen_voice[::6])):
        for index, clip in enumerate(group):
            name = f"{kind}-{clip.lang}-{index}.wav"
            soundfile.write(clips_dir / name, clip.audio, SAMPLE_RATE, subtype="PCM_16")
            records.append({"audio": f"clips/{name}", "lang": clip.lang, "voice": clip.voice, "kind": kind,
                            "pnc": clip.punctuated, "nopnc": clip.plain})
    # NeMo's transcripts of exactly what is committed (the 16-bit files), with the checkpoint's decoding.
    for pnc in (True, False):
        for lang in WORDS:
            group = [r for r in records if r["lang"] == lang]
            audio = [soundfile.read(out / r["audio"], dtype="float32")[0] for r in group]
            hyps = model.transcribe(audio, batch_size=4, verbose=False, source_lang=lang, target_lang=lang,
                                    task="transcribe", pnc="yes" if pnc else "no")
            for record, hyp in zip(group, hyps):
                record[f"nemo_{'pnc' if pnc else 'nopnc'}"] = hyp.text
    (out / "references.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--evaluate-only", action="store_true", help="reuse OUT/tiny-canary.nemo; redo clips and WER")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: apt-get install espeak-ng")
    started = time.monotonic()
    train_clips, unseen_text, unseen_voice = synthesise(args.seed)
    print(f"synthesised {len(train_clips)} training clips in {time.monotonic() - started:.0f}s")
    checkpoint = args.out / "tiny-canary.nemo"
    if args.evaluate_only:
        from nemo.collections.asr.models import EncDecMultiTaskModel

        model = EncDecMultiTaskModel.restore_from(str(checkpoint), map_location="cpu").eval()
    else:
        with tempfile.TemporaryDirectory(prefix="tiny-canary-tokenizers-") as scratch:
            model = build_model(train_tokenizers(Path(scratch), train_clips))
            train(model, train_clips, args.minutes, args.seed)
            args.out.mkdir(parents=True, exist_ok=True)
            model.save_to(str(checkpoint))
    scores = {
        "train": evaluate(model, "training sentences", train_clips[:: max(1, len(train_clips) // 48)]),
        "held_out_sentences": evaluate(model, "held-out sentences", unseen_text),
        "held_out_voices": evaluate(model, "held-out voices", unseen_voice),
    }
    write_clips(model, args.out, train_clips, unseen_text, unseen_voice)
    (args.out / "training.json").write_text(json.dumps({"seed": args.seed, "minutes": args.minutes,
                                                        "wer_nemo": scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
