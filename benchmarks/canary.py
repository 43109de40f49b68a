"""The Canary encoder-decoders in `make bench`: conversion to each output dtype, load, encoder, greedy decoder
steps, beside NeMo's EncDecMultiTaskModel in the same run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from families import FAMILIES  # noqa: F401 (the suite's families, which bench.py reads)
from measure import BIN, OUTPUTS, WORK, best_figures, build_in_child, build_once, copy_seconds, probe, run_sampled

_BUILD = ("import sys; from pathlib import Path; from families import FAMILIES; from factory import build; "
          "build(FAMILIES[sys.argv[1]], Path(sys.argv[2]))")


def build_checkpoint(family: str) -> Path:
    """The family's `.nemo`, built once with NeMo's own classes."""
    return build_once(f"{family}.nemo", lambda partial: build_in_child(_BUILD, family, str(partial)))


def bench(family: str, outputs: list[str], steps: int, repeats: int, rounds: int) -> list[dict]:
    return measure(family, build_checkpoint(family), outputs, steps, repeats, rounds, ("probe_mlx.py", "probe_nemo.py"))


def measure(family: str, source: Path, outputs: list[str], steps: int, repeats: int, rounds: int,
            probes: tuple[str, str]) -> list[dict]:
    """Conversions of `source` first; then the (MLX, NeMo) `probes` in alternation, `rounds` times, the best
    of each kept, so both sides meet the same background load."""
    mlx_probe, nemo_probe = probes
    copy_seconds(source)  # the first copy warms the page cache for everything after it
    rows = []
    for output in outputs:
        folder = WORK / f"{family}-{output}"
        cp = copy_seconds(source)
        converted = run_sampled([str(BIN / "canary-convert"), str(source), str(folder), "--force",
                                 *OUTPUTS[output]])
        # The summary line names the stages' times: "(write 7.5s, validate 0.5s, goldens 21.0s)".
        goldens = re.search(r"goldens ([0-9.]+)s", converted.output)
        rows.append({"family": family, "output": output, "convert_s": converted.seconds, "cp_s": cp,
                     "goldens_s": float(goldens.group(1)) if goldens else None,
                     "anon_peak": converted.anon_peak, "file_peak": converted.file_peak,
                     "max_rss": converted.max_rss})
    timed: dict[str, dict] = {}
    for _ in range(rounds):
        for output in outputs:
            result = probe(mlx_probe, str(WORK / f"{family}-{output}"), "--steps", str(steps),
                           "--repeats", str(repeats))
            timed[output] = best_figures(timed.get(output, result), result)
        result = probe(nemo_probe, str(source), "--steps", str(steps), "--repeats", str(repeats))
        timed["NeMo"] = best_figures(timed.get("NeMo", result), result)
        print(f"  {family}: {timed}", flush=True)
    for row in rows:
        row.update(timed[row["output"]])
        shutil.rmtree(WORK / f"{family}-{row['output']}")
    rows.append({"family": family, "output": "NeMo", "source_gb": source.stat().st_size / 1e9, **timed["NeMo"]})
    return rows


def describe(steps: int, repeats: int, rounds: int) -> str:
    return (f"Canary: decoder greedy, batch 1, {steps} steps after the prompt over 30 s of encoded audio; best of "
            f"{repeats} runs in each of {rounds} rounds of MLX and NeMo in turn; bound = bandwidth / bytes read "
            "per step")


def table(rows: list[dict], bandwidth: float) -> str:
    """One Markdown table: each MLX row beside its family's NeMo row, ratios against NeMo and `cp`."""
    header = ("| model | weights | convert s (x cp) | of which goldens s | peak anon / file-backed GB | load s | "
              "encoder 30 s, s (x NeMo) | decoder steps/s (x NeMo) | bound steps/s |")
    lines = [header, "|" + "---|" * 9]
    nemo = {row["family"]: row for row in rows if row["output"] == "NeMo"}
    for row in rows:
        reference = nemo[row["family"]]
        nemo_rate = reference["steps"] / reference["decoder_s"]
        if row["output"] == "NeMo":
            lines.append(f"| {row['family']} | NeMo, torch CPU ({row['source_gb']:.2f} GB .nemo) | | | | "
                         f"{row['load_s']:.1f} | {row['encoder_s']:.2f} | {nemo_rate:.2f} | |")
            continue
        rate = row["steps"] / row["decoder_s"]
        lines.append(
            f"| {row['family']} | {row['output']} | {row['convert_s']:.1f} ({row['convert_s'] / row['cp_s']:.2f}) | "
            f"{'' if row['goldens_s'] is None else format(row['goldens_s'], '.1f')} | "
            f"{row['anon_peak'] / 1e9:.2f} / {row['file_peak'] / 1e9:.2f} | {row['load_s']:.2f} | "
            f"{row['encoder_s']:.2f} ({row['encoder_s'] / reference['encoder_s']:.2f}) | "
            f"{rate:.2f} ({rate / nemo_rate:.1f}) | {bandwidth / row['step_bytes']:.1f} |"
        )
    return "\n".join(lines)
