"""`make bench`: conversion, memory, load and speed figures beside NeMo's, in one run, one table per suite.

Each suite (canary.py: the Canary encoder-decoders; parakeet.py: Parakeet transducers beside parakeet-mlx; one
module per model family kind) names its families.
For each family (`--families canary-180m-flash,canary-1b`; all by default, one after the other so only one
model is in memory at a time) a checkpoint with the family's real shapes is built once with NeMo and cached
in build/bench/. Then, in this run: `cp` of the checkpoint and `canary-convert` to each output dtype (wall
time; peak anonymous and file-backed memory sampled from /proc), and each converted folder and NeMo itself
timed in a process of its own (the suite's probes).

Figures, not tests: nothing is asserted. Other processes on the machine add noise; compare the ratios
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from types import ModuleType

from measure import BIN, REPO, WORK, cpu_name, quantize_available, read_bandwidth

sys.path.insert(0, str(REPO / "tests"))

import aligner  # noqa: E402
import canary  # noqa: E402
import parakeet  # noqa: E402
import salm  # noqa: E402

SUITES: list[ModuleType] = [canary, aligner, parakeet, salm]


def main() -> None:
    suite_of = {family: suite for suite in SUITES for family in suite.FAMILIES}
    # A suite with OUTPUTS converts to those it is asked for (the Canary families: measure.OUTPUTS; canary-qwen:
    # bfloat16, its release dtype, and float32); the others choose their own (parakeet.py: float32).
    output_sets = {suite: getattr(suite, "OUTPUTS", None) for suite in SUITES}
    known = list(dict.fromkeys(output for names in output_sets.values() if names for output in names))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(suite_of), help="comma-separated, from: " + ", ".join(suite_of))
    parser.add_argument("--outputs", default=",".join(known), help="comma-separated, from: " + ", ".join(known))
    parser.add_argument("--steps", type=int, default=32, help="greedy decoder steps timed per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per probe (the best is kept)")
    parser.add_argument("--rounds", type=int, default=2, help="MLX and NeMo probes in alternation (the best is kept)")
    args = parser.parse_args()
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(suite_of))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(suite_of)}")
    outputs = [name.strip() for name in args.outputs.split(",") if name.strip()]
    if sorted(set(outputs) - set(known)):
        parser.error(f"unknown outputs {sorted(set(outputs) - set(known))}; choose from {', '.join(known)}")
    if "8-bit" in outputs and not quantize_available():
        parser.error("this canary-convert has no --quantize")
    WORK.mkdir(parents=True, exist_ok=True)

    bandwidth = read_bandwidth()
    blas = subprocess.run([str(BIN / "canary-convert"), "--version"], capture_output=True, text=True).stdout
    started_load = os.getloadavg()[0]
    rows: dict[str, list[dict]] = {}
    for family in families:
        suite = suite_of[family]
        rows.setdefault(suite.__name__, []).extend(
            suite.bench(family, [output for output in outputs if output in (output_sets[suite] or outputs)],
                        args.steps, args.repeats, args.rounds))
    (WORK / "results.json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1) + "\n")

    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
          f"GiB; load average {started_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(blas.strip().replace("\n", "; "))
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for suite in SUITES:
        if suite.__name__ in rows:
            print(f"\n{suite.describe(args.steps, args.repeats, args.rounds)}\n")
            print(suite.table(rows[suite.__name__], bandwidth))


if __name__ == "__main__":
    main()
