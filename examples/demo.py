"""Transcribe the example clips with `canary-transcribe`, each transcript beside its reference, and the WER.

    python examples/demo.py MLX_FOLDER examples/tiny-canary
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wer import word_error_rate, word_errors


def transcribe(model: Path, clips: list[Path], lang: str, pnc: bool) -> list[str]:
    """One `canary-transcribe --json` run (the installed command, as a user types it)."""
    command = [str(Path(sys.executable).parent / "canary-transcribe"), *map(str, clips), "--model", str(model),
               "--source-lang", lang, "--pnc" if pnc else "--no-pnc", "--json"]
    return [record["text"].strip() for record in json.loads(subprocess.run(command, check=True, capture_output=True,
                                                                        text=True).stdout)]


def main() -> None:
    model, example = Path(sys.argv[1]), Path(sys.argv[2])
    references = json.loads((example / "references.json").read_text())
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
        print(f"WER ({label}): {word_error_rate(refs, hyps):.1%} over {sum(len(r.split()) for r in refs)} words")


if __name__ == "__main__":
    main()
