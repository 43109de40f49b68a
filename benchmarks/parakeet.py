"""Parakeet transducers in `make bench`: conversion (canary-convert's own layout and `--layout parakeet-mlx`), load,
encoder on 30 s, greedy decoding rate, and the encoder on 10 minutes with local attention, beside NeMo's
EncDecRNNTBPEModel and parakeet-mlx 0.6.0 on the same checkpoint, in the same run.

parakeet-tdt-0.6b-v2's shapes come from its public description and config (NVIDIA's model card: FastConformer XL,
24 layers, 600M parameters, TDT, a SentencePiece vocabulary of 1024; the layer widths are those of the public
model_config.yaml shared with parakeet-tdt-0.6b-v3, as quoted in public ports of it such as soniqo/speech-swift's
docs/parakeet-asr.md: 128 mels, dw_striding x8 with 256 channels, d_model 1024, 8 heads, FF x4, conv kernel 9,
2-layer LSTM prediction network of 640, joint of 640, durations 0-4). Approximated: the tokenizer is a BPE model
of 1024 pieces trained on made-up words (NVIDIA's is trained on English), and `xscaling` is off as v3's config
has it (a scale of the input, no cost either way). Random weights, built with NeMo's own classes by
tests/transducer_factory.py, whose joint is scaled so that decisions vary with the input.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from measure import BIN, WORK, best_figures, build_in_child, build_once, copy_seconds, probe, run_sampled
from transducer_factory import TransducerSpec

FAMILIES = {
    "parakeet-tdt-0.6b-v2": TransducerSpec(
        "parakeet-tdt-0.6b-v2", durations=(0, 1, 2, 3, 4), features=128, d_model=1024, enc_layers=24, enc_heads=8,
        subsampling_factor=8, conv_channels=256, conv_kernel=9, ff_expansion=4, xscaling=False, pred_hidden=640,
        pred_layers=2, joint_hidden=640, vocab=1024, pseudo_text=True, dropout=0.2),
}
# Each layout's conversion flags (float32: the fastest choice on an x86 CPU, see the Canary rows).
LAYOUTS = {"own": ["--dtype", "float32"], "parakeet-mlx": ["--dtype", "float32", "--layout", "parakeet-mlx"]}
LONG_MINUTES = 10
CONTEXT = 128  # NVIDIA's recipe: rel_pos_local_attn with [128, 128]

_BUILD = ("import sys; from pathlib import Path; from parakeet import FAMILIES; from transducer_factory import build; "
          "build(FAMILIES[sys.argv[1]], Path(sys.argv[2]))")


def build_checkpoint(family: str) -> Path:
    """The family's `.nemo`, built once with NeMo's own classes."""
    return build_once(f"{family}.nemo", lambda partial: build_in_child(_BUILD, family, str(partial)))


def _long(script: str, path: Path) -> dict:
    """One timed encoder run on LONG_MINUTES of audio with local attention, its process's memory sampled."""
    sampled = run_sampled([sys.executable, str(Path(__file__).parent / script), str(path),
                           "--minutes", str(LONG_MINUTES), "--context", str(CONTEXT)])
    return {**json.loads(sampled.output.strip().splitlines()[-1]), "long_anon_peak": sampled.anon_peak}


def bench(family: str, outputs: list[str], steps: int, repeats: int, rounds: int) -> list[dict]:
    """Conversions first (float32 whatever `outputs` asks: half and 8-bit folders are for Apple silicon, and
    parakeet-mlx reads float weights only); then our model, parakeet-mlx and NeMo in alternation, `rounds` times,
    the best of each kept; then the 10-minute encoders once each (heavy on a small machine). `steps` is the
    Canary suite's; a transducer decodes every frame of the 30 s."""
    source = build_checkpoint(family)
    copy_seconds(source)  # the first copy warms the page cache for everything after it
    rows = []
    for layout, flags in LAYOUTS.items():
        cp = copy_seconds(source)
        converted = run_sampled([str(BIN / "canary-convert"), str(source), str(WORK / f"{family}-{layout}"),
                                 "--force", *flags])
        rows.append({"family": family, "output": layout, "convert_s": converted.seconds, "cp_s": cp,
                     "anon_peak": converted.anon_peak, "file_peak": converted.file_peak})
    features = WORK / f"{family}-features.npy"
    own, theirs = str(WORK / f"{family}-own"), str(WORK / f"{family}-parakeet-mlx")
    timed: dict[str, dict] = {}
    for _ in range(rounds):
        for name, script, args in (("own", "probe_transducer_mlx.py", [own, "--features-out", str(features)]),
                                   ("parakeet-mlx", "probe_parakeet_mlx.py", [theirs, "--features", str(features)]),
                                   ("NeMo", "probe_transducer_nemo.py", [str(source)])):
            result = probe(script, *args, "--repeats", str(repeats))
            timed[name] = best_figures(timed.get(name, result), result)
        print(f"  {family}: {timed}", flush=True)
    # parakeet-mlx's default dtype, one cold run: on an x86 CPU MLX multiplies bfloat16 in scalar loops (minutes).
    timed["parakeet-mlx bfloat16"] = probe("probe_parakeet_mlx.py", theirs, "--features", str(features),
                                           "--dtype", "bfloat16", "--repeats", "1", "--cold")
    timed["own"].update(_long("probe_transducer_mlx.py", Path(own)))
    timed["NeMo"].update(_long("probe_transducer_nemo.py", source))
    print(f"  {family}: {timed}", flush=True)
    for row in rows:
        row.update(timed[row["output"]])
    rows.append({"family": family, "output": "parakeet-mlx bfloat16", **timed["parakeet-mlx bfloat16"]})
    rows.append({"family": family, "output": "NeMo", "source_gb": source.stat().st_size / 1e9, **timed["NeMo"]})
    for layout in LAYOUTS:
        shutil.rmtree(WORK / f"{family}-{layout}")
    features.unlink()
    return rows


def describe(steps: int, repeats: int, rounds: int) -> str:
    return (f"Parakeet: float32 folders; encoder on 30 s (ours and NeMo's from audio, parakeet-mlx's from our "
            f"features); greedy decoding of that 30 s encoder output, batch 1 (frames/s = encoder frames / decoding "
            f"time; symbols = labels emitted); best of {repeats} runs in each of {rounds} rounds of ours, parakeet-mlx "
            f"and NeMo in turn; encoder on {LONG_MINUTES} min with local attention [{CONTEXT}, {CONTEXT}], one run "
            f"each, anonymous peak of that process")


def table(rows: list[dict], bandwidth: float) -> str:
    """One Markdown table: each runtime beside its family's NeMo row, ratios against NeMo and `cp`."""
    header = ("| model | runtime, weights | convert s (x cp) | peak anon / file-backed GB | load s | "
              "encoder 30 s, s (x NeMo) | decoding frames/s (x NeMo), symbols | "
              f"encoder {LONG_MINUTES} min local, s (x NeMo) | its peak anon GB |")
    lines = [header, "|" + "---|" * 9]
    nemo = {row["family"]: row for row in rows if row["output"] == "NeMo"}
    for row in rows:
        reference = nemo[row["family"]]
        nemo_rate = reference["frames"] / reference["decode_s"]
        rate = row["frames"] / row["decode_s"]
        runtime = {"own": "canary-convert, float32", "parakeet-mlx": "parakeet-mlx 0.6.0 (`--layout parakeet-mlx`), float32",
                   "parakeet-mlx bfloat16": "parakeet-mlx 0.6.0, same folder in bfloat16 (its default)",
                   "NeMo": f"NeMo, torch CPU ({row.get('source_gb', 0):.2f} GB .nemo)"}[row["output"]]
        convert = (f"{row['convert_s']:.1f} ({row['convert_s'] / row['cp_s']:.2f})" if "convert_s" in row else "")
        memory = f"{row['anon_peak'] / 1e9:.2f} / {row['file_peak'] / 1e9:.2f}" if "anon_peak" in row else ""
        encoder = f"{row['encoder_s']:.2f}" + ("" if row is reference else
                                                 f" ({row['encoder_s'] / reference['encoder_s']:.2f})")
        decoding = f"{rate:.0f}" + ("" if row is reference else f" ({rate / nemo_rate:.1f})") + f", {row['symbols']}"
        long = ""
        if "long_s" in row:
            long = f"{row['long_s']:.1f}" + ("" if row is reference else f" ({row['long_s'] / reference['long_s']:.2f})")
        long_peak = f"{row['long_anon_peak'] / 1e9:.2f}" if "long_anon_peak" in row else ""
        lines.append(f"| {row['family']} | {runtime} | {convert} | {memory} | {row['load_s']:.2f} | {encoder} | "
                     f"{decoding} | {long} | {long_peak} |")
    return "\n".join(lines)
