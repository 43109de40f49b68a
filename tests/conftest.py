"""Shared fixtures: tiny NeMo checkpoints, built once per test session with NeMo itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

# NeMo is the reference implementation: without it the suite must fail loudly, never skip.
import nemo.collections.asr  # noqa: F401

from canary_convert.convert import ConvertOptions, convert
from factory import QUANTIZABLE_VARIANTS, VARIANTS, build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny variant as a `.nemo` file (built with NeMo's save_to)."""
    folder = tmp_path_factory.mktemp("nemo")
    return {name: build(spec, folder / f"{name}.nemo") for name, spec in VARIANTS.items()}


@pytest.fixture(scope="session")
def quantizable_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-BPE variants whose widths the default group size divides (see factory.py)."""
    folder = tmp_path_factory.mktemp("nemo-quantizable")
    return {name: build(spec, folder / f"{name}.nemo") for name, spec in QUANTIZABLE_VARIANTS.items()}


@pytest.fixture(scope="session")
def checkpoint(checkpoints: dict[str, Path]) -> Path:
    """The default variant, for tests that need just one."""
    return checkpoints["canary-sub8"]


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    """A converted folder copied under `tmp_path/copy`, links kept as links, for a test to change."""
    return Path(shutil.copytree(folder, tmp_path / "copy", symlinks=True))


def rerecord(folder: Path, *names: str, drop: tuple[str, ...] = ()) -> None:
    """Re-record files in the folder's manifest (and drop others), as someone hiding a change would."""
    from canary_convert.manifest import hash_file

    record = json.loads((folder / "conversion.json").read_text())
    for name in drop:
        record["manifest"].pop(name)
    for name in names:
        record["manifest"][name] = hash_file(folder / name).to_dict()
    (folder / "conversion.json").write_text(json.dumps(record))


def encoder_matches_nemo(nemo_model: Any, model: Any, signals: list[np.ndarray]) -> tuple[Any, list[int], mx.array, mx.array]:
    """A padded batch's features (same frame counts, max |Δ| <= 1e-4) and encoder states (same lengths, each
    row's relative L2 <= 1e-5, both encoders on NeMo's features) against NeMo's. Returns NeMo's encoder output
    (B, D, T, torch) and lengths, for the head's checks, and ours (B, T, D) with its lengths."""
    import torch

    from canary_convert.model.app.clips import pad_batch
    from canary_convert.parity import nemo_features

    batch, lengths = pad_batch(signals)
    features, frames = model.preprocess(mx.array(batch), mx.array(lengths))
    reference, reference_frames = nemo_features(nemo_model, signals)
    assert np.array_equal(np.array(frames), reference_frames)
    assert float(np.abs(np.array(features) - reference).max()) <= 1e-4
    with torch.no_grad():
        encoded, enc_lengths = nemo_model.encoder(audio_signal=torch.from_numpy(reference),
                                            length=torch.from_numpy(reference_frames))
    ours, our_lengths = model.encode(mx.array(reference), mx.array(reference_frames))
    assert np.array_equal(np.array(our_lengths), enc_lengths.numpy())
    theirs = encoded.transpose(1, 2).numpy()
    for row, valid in enumerate(enc_lengths.tolist()):
        mine, reference_row = np.array(ours)[row, :valid], theirs[row, :valid]
        assert np.linalg.norm(mine - reference_row) / np.linalg.norm(reference_row) <= 1e-5
    return encoded, enc_lengths.tolist(), ours, our_lengths


def restore_nemo_models(checkpoints: Mapping[str, Path]) -> dict[str, Any]:
    """Each `.nemo` restored by NeMo's own ASRModel on the CPU, in inference mode, its logging quiet."""
    from nemo.collections.asr.models import ASRModel
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(nemo_logging.ERROR)
    return {name: ASRModel.restore_from(str(path), map_location="cpu").eval() for name, path in checkpoints.items()}


def convert_each(checkpoints: Mapping[str, Path], folder: Path) -> dict[str, Path]:
    """Each `.nemo` converted with the default options into folder/NAME."""
    return {name: convert(str(path), folder / name, ConvertOptions()).out for name, path in checkpoints.items()}


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A 127.0.0.1 url whose port is bound but not listening: every connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `canary-convert` as users do: a separate process, its exit code and output."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "canary-convert"), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )


# Runs a command as the child of a small launcher, which reports the child's peak resident memory. Measured
# from here directly, the peak would include this process's: Linux carries the old address space's high-water
# mark across execve into the new program's ru_maxrss, and a test session grows to gigabytes.
_LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], env: dict[str, str] | None = None, timeout: float = 300
                 ) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run `command`, with its wall time in seconds and its own peak resident memory in MiB (the kernel's
    count for that one process), to bound what a hostile input costs."""
    with tempfile.TemporaryDirectory() as scratch:
        report, out, err = (Path(scratch) / name for name in ("peak", "out", "err"))
        with out.open("wb") as out_file, err.open("wb") as err_file:
            started = time.monotonic()
            process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *command], stdout=out_file,
                                       stderr=err_file, env=env, cwd=REPO, start_new_session=True)
            timer = threading.Timer(timeout, os.killpg, (process.pid, 9))
            timer.start()
            try:
                returncode = process.wait()
            finally:
                timer.cancel()
            seconds = time.monotonic() - started
        peak_kib = int(report.read_text()) if report.is_file() else 0
        result = subprocess.CompletedProcess(command, returncode, out.read_text(), err.read_text())
    return result, seconds, peak_kib // 1024


def run_cli_measured(*args: str, env: dict[str, str] | None = None, timeout: float = 300
                     ) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """`run_cli`, measured as `run_measured` measures."""
    return run_measured([str(Path(sys.executable).parent / "canary-convert"), *args], env=env, timeout=timeout)
