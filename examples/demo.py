"""Transcribe the example clips with `canary-transcribe`, each transcript beside its reference, and the WER;
then a three-minute recording per language made of those clips (examples/long_audio.py), transcribed whole.

    python examples/demo.py MLX_FOLDER examples/tiny-canary [OUT_FOLDER]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import soundfile
from long_audio import build_long_audio
from wer import word_error_rate, word_errors

# The example model was trained on single utterances under 2 s: long recordings are cut at pauses into
# chunks of at most that (NeMo's fixed 40 s chunks would hand it many utterances at once).
LONG_FORM = ["--chunking", "pauses", "--chunk-seconds", "2"]


def canary_transcribe(model: Path, audio: list[Path], *options: str) -> str:
    """One `canary-transcribe` run (the installed command, as a user types it); its stdout."""
    command = [str(Path(sys.executable).parent / "canary-transcribe"), *map(str, audio), "--model", str(model),
               *options]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def transcribe(model: Path, clips: list[Path], lang: str, pnc: bool) -> list[str]:
    records = json.loads(canary_transcribe(model, clips, "--source-lang", lang, "--pnc" if pnc else "--no-pnc",
                                           "--json"))
    return [record["text"].strip() for record in records]


def clips_section(model: Path, example: Path, references: list[dict]) -> dict[str, str]:
    """Per-clip transcripts and WER; returns the punctuated transcript of each clip."""
    per_clip = {}
    for pnc in (True, False):
        label = "pnc" if pnc else "nopnc"
        refs, hyps = [], []
        print(f"\n--- punctuation and capitals {'on' if pnc else 'off'} ---")
        for lang in sorted({r["lang"] for r in references}):
            group = [r for r in references if r["lang"] == lang]
            texts = transcribe(model, [example / r["audio"] for r in group], lang, pnc)
            for record, text in zip(group, texts):
                mark = "ok " if word_errors(record[label], text) == 0 else "ERR"
                print(f"{mark} {Path(record['audio']).name:24s} ref: {record[label]:32s} got: {text}")
                refs.append(record[label])
                hyps.append(text)
                if pnc:
                    per_clip[record["audio"]] = text
        print(f"WER ({label}): {word_error_rate(refs, hyps):.1%} over {sum(len(r.split()) for r in refs)} words")
    return per_clip


def long_section(model: Path, example: Path, out: Path, langs: list[str], per_clip: dict[str, str]) -> None:
    print(f"\n--- long recordings: the clips joined with pauses, canary-transcribe {' '.join(LONG_FORM)} ---")
    for lang in langs:
        audio = build_long_audio(example, lang)
        path = out / f"long-{lang}.wav"
        soundfile.write(path, audio.samples, 16000, subtype="FLOAT")
        result = json.loads(canary_transcribe(model, [path], "--source-lang", lang, *LONG_FORM, "--format",
                                              "json"))[0]
        srt = canary_transcribe(model, [path], "--source-lang", lang, *LONG_FORM, "--format", "srt")
        (out / f"long-{lang}.srt").write_text(srt)
        reference = " ".join(record["pnc"] for record in audio.records)
        alone = " ".join(per_clip[record["audio"]] for record in audio.records)
        print(f"{path.name}: {audio.seconds:.0f} s, {len(audio.records)} utterances, {len(result['chunks'])} chunks; "
              f"WER {word_error_rate([reference], [result['text']]):.1%} "
              f"(the same utterances clip by clip: {word_error_rate([reference], [alone]):.1%}); subtitles: "
              f"{out / f'long-{lang}.srt'}")
        print("   " + "\n   ".join(srt.splitlines()[:7]))


def main() -> None:
    model, example = Path(sys.argv[1]), Path(sys.argv[2])
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else model.parent
    references = json.loads((example / "references.json").read_text())
    per_clip = clips_section(model, example, references)
    long_section(model, example, out, sorted({r["lang"] for r in references}), per_clip)


if __name__ == "__main__":
    main()
