"""`make bench`: conversion, memory, load, encoder and decoder figures beside NeMo's, in one run, one table.

For each family (`--families canary-180m-flash,canary-1b`; all four by default, one after the other so
only one model is in memory at a time) a checkpoint with the family's real shapes is built once with NeMo
and cached in build/bench/. Then, in this run: `cp` of the `.nemo` and `canary-convert` to each output
dtype (wall time; peak anonymous and file-backed memory sampled from /proc), and each converted folder
and NeMo itself timed in a process of its own (probe_mlx.py, probe_nemo.py). The decoder's memory-
bandwidth bound is this machine's measured read bandwidth over the bytes one step reads.

Figures, not tests: nothing is asserted. Other processes on the machine add noise; compare the ratios
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from families import FAMILIES  # noqa: E402

WORK = REPO / "build" / "bench"
BIN = Path(sys.executable).parent
# Each probe and the build run as `python benchmarks/x.py`: tests/ (the factory) and benchmarks/ on the path.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO / "tests")])}
OUTPUTS = {"float32": ["--dtype", "float32"], "float16": ["--dtype", "float16"], "8-bit": ["--quantize", "8"]}


@dataclass
class Sampled:
    """A child process's wall time and the peaks of its resident memory, split by kind."""

    seconds: float
    anon_peak: int  # bytes: heap, stacks, anonymous maps (RssAnon)
    file_peak: int  # bytes: pages of mapped files (RssFile), reclaimable; `time -v` adds them to max RSS
    max_rss: int  # bytes: the kernel's own peak of both (ru_maxrss)
    output: str  # what it printed (stdout and stderr)


def _status_bytes(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "RssAnon" not in fields:  # a zombie keeps its status file but no memory
        return None
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile"))  # type: ignore[return-value]


def run_sampled(command: list[str]) -> Sampled:
    """Run `command`, sampling /proc/PID/status every 10 ms; fail loudly with its output if it fails.

    Writes count until they are on disk: the dirty pages of earlier commands are flushed before the clock
    starts, and the command's own before it stops (otherwise one command's writes slow the next one down).
    """
    os.sync()
    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=CHILD_ENV)
        peaks = [0, 0]

        def sample() -> None:
            while (current := _status_bytes(process.pid)) is not None:
                peaks[0], peaks[1] = max(peaks[0], current[0]), max(peaks[1], current[1])
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        os.sync()
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
        output.seek(0)
        printed = output.read()
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{printed[-3000:]}")
    return Sampled(seconds, peaks[0], peaks[1], usage.ru_maxrss * 1024, printed)


def probe(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                            text=True, env=CHILD_ENV)
    if result.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory: the best of a sum and a matrix-vector product
    over 1 GB of float32 (far larger than any cache)."""
    matrix = np.ones((16384, 16384), dtype=np.float32)
    vector = np.ones(16384, dtype=np.float32)
    best = float("inf")
    for run in (matrix.sum, lambda: matrix @ vector) * 3:
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return matrix.nbytes / best


def build_checkpoint(family: str) -> Path:
    """The family's `.nemo`, built once with NeMo (in a child process, so its memory is given back)."""
    target = WORK / f"{family}.nemo"
    if target.exists():
        return target
    partial = target.with_suffix(".partial.nemo")
    started = time.perf_counter()
    code = ("import sys; from pathlib import Path; from families import FAMILIES; from factory import build; "
            "build(FAMILIES[sys.argv[1]], Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, family, str(partial)], check=True, env=CHILD_ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial.rename(target)
    print(f"built {target.name} ({target.stat().st_size / 1e9:.2f} GB) with NeMo in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return target


def copy_seconds(source: Path) -> float:
    """Wall time of `cp` of the same file to the same disk the conversion writes to, until on disk."""
    target = WORK / "cp-target.nemo"
    sampled = run_sampled(["cp", str(source), str(target)])
    target.unlink()
    return sampled.seconds


def quantize_available() -> bool:
    result = subprocess.run([str(BIN / "canary-convert"), "--help"], capture_output=True, text=True)
    return "--quantize" in result.stdout


def _best(first: dict, second: dict) -> dict:
    """The faster of two probe results, figure by figure (each side's least disturbed run)."""
    return {key: min(value, second[key]) if key.endswith("_s") else value for key, value in first.items()}


def bench_family(family: str, outputs: list[str], steps: int, repeats: int, rounds: int) -> list[dict]:
    """Conversions first; then the MLX and NeMo probes in alternation, `rounds` times, the best of each kept,
    so both sides meet the same background load."""
    source = build_checkpoint(family)
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
            result = probe("probe_mlx.py", str(WORK / f"{family}-{output}"), "--steps", str(steps),
                           "--repeats", str(repeats))
            timed[output] = _best(timed.get(output, result), result)
        result = probe("probe_nemo.py", str(source), "--steps", str(steps), "--repeats", str(repeats))
        timed["NeMo"] = _best(timed.get("NeMo", result), result)
        print(f"  {family}: {json.dumps(timed)}", flush=True)
    for row in rows:
        row.update(timed[row["output"]])
        shutil.rmtree(WORK / f"{family}-{row['output']}")
    rows.append({"family": family, "output": "NeMo", "source_gb": source.stat().st_size / 1e9, **timed["NeMo"]})
    return rows


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="canary-180m-flash,canary-1b-flash,canary-1b-v2,canary-1b",
                        help="comma-separated, from: " + ", ".join(FAMILIES))
    parser.add_argument("--outputs", default=",".join(OUTPUTS), help="comma-separated, from: " + ", ".join(OUTPUTS))
    parser.add_argument("--steps", type=int, default=32, help="greedy decoder steps timed per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per probe (the best is kept)")
    parser.add_argument("--rounds", type=int, default=2, help="MLX and NeMo probes in alternation (the best is kept)")
    args = parser.parse_args()
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    outputs = [name.strip() for name in args.outputs.split(",") if name.strip()]
    if sorted(set(outputs) - set(OUTPUTS)):
        parser.error(f"unknown outputs {sorted(set(outputs) - set(OUTPUTS))}; choose from {', '.join(OUTPUTS)}")
    if "8-bit" in outputs and not quantize_available():
        parser.error("this canary-convert has no --quantize")
    WORK.mkdir(parents=True, exist_ok=True)

    bandwidth = read_bandwidth()
    blas = subprocess.run([str(BIN / "canary-convert"), "--version"], capture_output=True, text=True).stdout
    started_load = os.getloadavg()[0]
    rows = []
    for family in families:
        rows += bench_family(family, outputs, args.steps, args.repeats, args.rounds)
    (WORK / "results.json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1) + "\n")

    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
          f"GiB; load average {started_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(blas.strip().replace("\n", "; "))
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; decoder: greedy, batch 1, {args.steps} steps after the "
          f"prompt over 30 s of encoded audio; best of {args.repeats} runs in each of {args.rounds} rounds of MLX and "
          f"NeMo in turn; bound = bandwidth / bytes read per step\n")
    print(table(rows, bandwidth))


if __name__ == "__main__":
    main()
