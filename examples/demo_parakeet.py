"""Transcribe the example clips with the example Parakeet (examples/tiny-parakeet, a hybrid TDT-CTC model trained
on the same speech, lower case without punctuation): each head of its float32 folder and the TDT head of its
8-bit folder, with `canary-transcribe`, each transcript beside its reference, and the WER; then one clip's words
with their times.

    python examples/demo_parakeet.py FLOAT32_FOLDER EIGHT_BIT_FOLDER examples/tiny-canary
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from demo import canary_transcribe
from wer import word_error_rate, word_errors


def heads_section(folders: dict[str, Path], example: Path, references: list[dict]) -> None:
    clips = [example / record["audio"] for record in references]
    wanted = [record["nopnc"].lower() for record in references]
    for name, (folder, options) in folders.items():
        records = json.loads(canary_transcribe(folder, clips, *options, "--json"))
        texts = [record["text"].strip() for record in records]
        print(f"\n--- {name} ---")
        for clip, reference, text in zip(clips, wanted, texts):
            mark = "ok " if word_errors(reference, text) == 0 else "ERR"
            print(f"{mark} {clip.name:24s} ref: {reference:32s} got: {text}")
        print(f"WER: {word_error_rate(wanted, texts):.1%} over {sum(len(r.split()) for r in wanted)} words")


def main() -> None:
    float32, eight_bit, example = (Path(arg) for arg in sys.argv[1:4])
    references = json.loads((example / "references.json").read_text())
    heads_section({"TDT head, float32": (float32, []), "CTC head, float32": (float32, ["--decoder", "ctc"]),
                   "TDT head, 8-bit": (eight_bit, [])}, example, references)
    clip = example / references[0]["audio"]
    words = json.loads(canary_transcribe(float32, [clip], "--timestamps", "--json"))[0]["words"]
    print(f"\n{clip.name}, words with their times (TDT head, --timestamps):")
    for word in words:
        print(f"   {word['start']:5.2f}-{word['end']:5.2f} s  {word['word']}")


if __name__ == "__main__":
    main()
