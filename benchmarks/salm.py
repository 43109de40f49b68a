"""canary-qwen (NeMo's speechlm2 SALM) in `make bench`: conversion to each output dtype, load, encoder, greedy
generated tokens per second of the LLM half (mlx-lm), beside NeMo's own SALM in the same run.

The checkpoint has canary-qwen-2.5b's shapes and random weights, built once with NeMo's SALM
(tests/salm_factory.py) and saved as the Hub repo holds it: config.json and one bfloat16 model.safetensors,
with the LLM's config and tokenizer in a folder beside it (`pretrained_llm`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from measure import BIN, REPO, WORK, best_figures, build_in_child, build_once, copy_seconds, run_sampled
from salm_factory import SalmSpec, set_pretrained_llm

# canary-qwen-2.5b: canary-1b-flash's encoder (32 layers, d_model 1024, 8 heads, 128 mels, dw_striding x8 with
# 256 channels, conv kernel 9, FF x4) and Qwen3-1.7B (its public config.json: hidden 2048, intermediate 6144,
# 28 layers, 16 heads, 8 key/value heads, head_dim 128, 151936 embedding rows, tied, 40960 positions), LoRA
# r 128 alpha 256 on q_proj and v_proj. The tokenizer is the factory's small one; its embedding rows are
# padded to the real vocabulary, so the embedding and output layer have their real size.
FAMILIES = {
    "canary-qwen-2.5b": SalmSpec("canary-qwen-2.5b", features=128, d_model=1024, enc_layers=32, enc_heads=8,
                                 subsampling_factor=8, conv_channels=256, conv_kernel=9, ff_expansion=4,
                                 hidden=2048, intermediate=6144, llm_layers=28, heads=16, kv_heads=8, head_dim=128,
                                 tie_embeddings=True, lora_rank=128, lora_alpha=256, vocab_size=151936,
                                 max_positions=40960),
}
# The Hub's checkpoint is stored in bfloat16; so is this one, and the conversions read it as users' do.
OUTPUTS = {"bfloat16": ["--dtype", "bfloat16"], "float32": ["--dtype", "float32"]}

_BUILD = ("import sys, torch; from pathlib import Path; from salm import FAMILIES; "
          "from salm_factory import build_model; out = Path(sys.argv[2]); "
          "model = build_model(FAMILIES[sys.argv[1]], out / 'llm').to(torch.bfloat16); "
          "model.save_pretrained(str(out / 'salm'))")


def build_checkpoint(family: str) -> tuple[Path, Path]:
    """The SALM folder (config.json, model.safetensors) and its LLM folder, built once with NeMo's classes."""
    built = build_once(family, lambda partial: build_in_child(_BUILD, family, str(partial)))
    set_pretrained_llm(built / "salm", str(built / "llm"))  # the folder moved once built
    return built / "salm", built / "llm"


def bench(family: str, outputs: list[str], steps: int, repeats: int, rounds: int) -> list[dict]:
    """Conversions first; then the MLX and NeMo probes in alternation, `rounds` times, the best of each kept."""
    source, llm = build_checkpoint(family)
    copy_seconds(source)  # warms the page cache for everything after it
    rows = []
    for output in outputs:
        folder = WORK / f"{family}-{output}"
        cp = copy_seconds(source)
        converted = run_sampled([str(BIN / "canary-convert"), str(source), str(folder), "--force",
                                 "--llm-source", str(llm), *OUTPUTS[output]])
        rows.append({"family": family, "output": output, "convert_s": converted.seconds, "cp_s": cp,
                     "anon_peak": converted.anon_peak, "file_peak": converted.file_peak})
    timed: dict[str, dict] = {}
    for _ in range(rounds):
        for output in outputs:
            result = probe_sampled("probe_salm_mlx.py", str(WORK / f"{family}-{output}"), steps, repeats)
            timed[output] = best_figures(timed.get(output, result), result)
        result = probe_sampled("probe_salm_nemo.py", str(source), steps, repeats)
        timed["NeMo"] = best_figures(timed.get("NeMo", result), result)
        print(f"  {family}: {timed}", flush=True)
    for row in rows:
        row.update(timed[row["output"]])
        shutil.rmtree(WORK / f"{family}-{row['output']}")
    size = sum(path.stat().st_size for path in source.iterdir())
    rows.append({"family": family, "output": "NeMo", "source_gb": size / 1e9, **timed["NeMo"]})
    return rows


def probe_sampled(script: str, folder: str, steps: int, repeats: int) -> dict:
    """A probe's figures (its last line of JSON), and the peaks of its memory while it loaded and ran."""
    sampled = run_sampled([sys.executable, str(REPO / "benchmarks" / script), folder, "--steps", str(steps),
                           "--repeats", str(repeats)])
    (line,) = [line for line in sampled.output.splitlines() if line.startswith("{")][-1:]
    return {**json.loads(line), "anon_peak_run": sampled.anon_peak, "file_peak_run": sampled.file_peak}


def describe(steps: int, repeats: int, rounds: int) -> str:
    return (f"canary-qwen: greedy generation, batch 1, from the prompt with 30 s of audio spliced in: prefill = a "
            f"generation of one token, tokens/s = {steps} more tokens over the time they add (end of sequence "
            f"suppressed on both sides); best of {repeats} runs in each of {rounds} rounds of MLX and NeMo in turn; "
            "run peak = the process that loads and runs the model; bound = bandwidth / bytes a step reads (the "
            "LLM's weights as held in memory and the key/value cache)")


def table(rows: list[dict], bandwidth: float) -> str:
    """One Markdown table: each MLX row beside the family's NeMo row, ratios against NeMo and `cp`."""
    header = ("| model | weights | convert s (x cp) | convert peak anon / file-backed GB | load s | "
              "run peak anon / file-backed GB | encoder 30 s, s (x NeMo) | prefill s (x NeMo) | tokens/s (x NeMo) | "
              "bound tokens/s |")
    lines = [header, "|" + "---|" * 10]
    nemo = {row["family"]: row for row in rows if row["output"] == "NeMo"}
    for row in rows:
        reference = nemo[row["family"]]
        nemo_rate = reference["steps"] / reference["generate_s"]
        run_peak = f"{row['anon_peak_run'] / 1e9:.2f} / {row['file_peak_run'] / 1e9:.2f}"
        if row["output"] == "NeMo":
            lines.append(f"| {row['family']} | NeMo, torch CPU float32 ({row['source_gb']:.2f} GB bfloat16 folder) "
                         f"| | | {row['load_s']:.1f} | {run_peak} | {row['encoder_s']:.2f} | {row['prefill_s']:.2f} | "
                         f"{nemo_rate:.2f} | |")
            continue
        rate = row["steps"] / row["generate_s"]
        lines.append(
            f"| {row['family']} | {row['output']} | {row['convert_s']:.1f} ({row['convert_s'] / row['cp_s']:.2f}) | "
            f"{row['anon_peak'] / 1e9:.2f} / {row['file_peak'] / 1e9:.2f} | {row['load_s']:.2f} | {run_peak} | "
            f"{row['encoder_s']:.2f} ({row['encoder_s'] / reference['encoder_s']:.2f}) | "
            f"{row['prefill_s']:.2f} ({row['prefill_s'] / reference['prefill_s']:.2f}) | "
            f"{rate:.2f} ({rate / nemo_rate:.1f}) | {bandwidth / row['step_bytes']:.1f} |"
        )
    return "\n".join(lines)
