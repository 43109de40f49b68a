"""canary-1b-v2 with its timestamp aligner in `make bench`: conversion of the `.nemo` that packs both models
(as the release does), and timestamped transcription of 30 s (the Canary's greedy steps, then the aligner's
CTC log-probs and forced alignment), ours beside NeMo's `transcribe(timestamps=True)` in the same run."""

from __future__ import annotations

from pathlib import Path

import canary
from families import ALIGNED
from measure import OUTPUTS, build_in_child, build_once

FAMILIES = ALIGNED
__all__ = ["FAMILIES", "OUTPUTS", "bench", "describe", "table"]  # OUTPUTS: the Canary families' dtypes

# The aligner reads the Canary's own tokenizer, as the release's does (families.py says where that is from).
_BUILD = ("import sys, tempfile; from pathlib import Path; from families import ALIGNED; "
          "from factory import build_ctc, canary_tokenizer, with_aligner\n"
          "canary = Path(sys.argv[2])\n"
          "with tempfile.TemporaryDirectory(dir=Path(sys.argv[3]).parent) as scratch:\n"
          "    tokenizer = canary_tokenizer(canary, Path(scratch) / 'tokenizer')\n"
          "    aligner = build_ctc(ALIGNED[sys.argv[1]][1], Path(scratch) / 'aligner.nemo', tokenizer)\n"
          "    with_aligner(canary, aligner, Path(sys.argv[3]))")


def build_checkpoint(family: str) -> Path:
    """The family's Canary (built once by the Canary suite) with a real-shape aligner packed in."""
    source = canary.build_checkpoint(ALIGNED[family][0])
    return build_once(f"{family}.nemo", lambda partial: build_in_child(_BUILD, family, str(source), str(partial)))


def bench(family: str, outputs: list[str], steps: int, repeats: int, rounds: int) -> list[dict]:
    return canary.measure(family, build_checkpoint(family), outputs, steps, repeats, rounds,
                          ("probe_timestamps_mlx.py", "probe_timestamps_nemo.py"))


def describe(steps: int, repeats: int, rounds: int) -> str:
    return (f"canary-1b-v2 with its aligner: transcription of 30 s with word and segment times, batch 1, the "
            f"Canary's greedy search held to {steps} tokens, then the aligner and the forced alignment; best of "
            f"{repeats} runs in each of {rounds} rounds of MLX and NeMo in turn")


def table(rows: list[dict], bandwidth: float) -> str:
    """One Markdown table: each MLX row beside its family's NeMo row, ratios against NeMo and `cp`."""
    del bandwidth  # the decoder's bound is in the Canary suite's table
    header = ("| model | weights | convert s (x cp) | of which goldens s | peak anon / file-backed GB | load s | "
              "timestamped 30 s, s (x NeMo) | tokens / words / segments |")
    lines = [header, "|" + "---|" * 8]
    nemo = {row["family"]: row for row in rows if row["output"] == "NeMo"}
    for row in rows:
        counts = f"{row['tokens']} / {row['words']} / {row['segments']}"
        if row["output"] == "NeMo":
            lines.append(f"| {row['family']} | NeMo, torch CPU ({row['source_gb']:.2f} GB .nemo) | | | | "
                         f"{row['load_s']:.1f} | {row['transcribe_s']:.2f} | {counts} |")
            continue
        ratio = row["transcribe_s"] / nemo[row["family"]]["transcribe_s"]
        lines.append(
            f"| {row['family']} | {row['output']} | {row['convert_s']:.1f} ({row['convert_s'] / row['cp_s']:.2f}) | "
            f"{'' if row['goldens_s'] is None else format(row['goldens_s'], '.1f')} | "
            f"{row['anon_peak'] / 1e9:.2f} / {row['file_peak'] / 1e9:.2f} | {row['load_s']:.2f} | "
            f"{row['transcribe_s']:.2f} ({ratio:.2f}) | {counts} |")
    return "\n".join(lines)
