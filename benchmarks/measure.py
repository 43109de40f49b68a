"""What every `make bench` suite measures with: child processes sampled from /proc, probes, `cp`, bandwidth.

Parent-side only (the probes, which run in children of their own, share common.py instead).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
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


def build_once(name: str, build: Callable[[Path], None]) -> Path:
    """`WORK/name`, made once by `build(partial_path)` (which must write that path) and cached across runs."""
    target = WORK / name
    if target.exists():
        return target
    partial = target.with_name(f"partial-{target.name}")
    if partial.is_dir():
        shutil.rmtree(partial)
    started = time.perf_counter()
    build(partial)
    partial.rename(target)
    print(f"built {target.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return target


def build_in_child(code: str, *args: str) -> None:
    """Run `code` (Python; arguments in sys.argv[1:]) in a child on the benchmarks' and tests' path, so
    NeMo's memory is given back when it ends; its output is shown only if it fails."""
    result = subprocess.run([sys.executable, "-c", code, *args], env=CHILD_ENV, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"building {args} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")


def copy_seconds(source: Path) -> float:
    """Wall time of `cp` of the same file or folder to the same disk the conversion writes to, until on disk."""
    target = WORK / f"cp-target-{source.name}"
    sampled = run_sampled(["cp", "-r", str(source), str(target)])
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return sampled.seconds


def quantize_available() -> bool:
    result = subprocess.run([str(BIN / "canary-convert"), "--help"], capture_output=True, text=True)
    return "--quantize" in result.stdout


def best_figures(first: dict, second: dict) -> dict:
    """The faster of two probe results, figure by figure (each side's least disturbed run)."""
    return {key: min(value, second[key]) if key.endswith("_s") else value for key, value in first.items()}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
