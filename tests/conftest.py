"""Shared fixtures: tiny NeMo checkpoints, built once per test session with NeMo itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# NeMo is the reference implementation: without it the suite must fail loudly, never skip.
import nemo.collections.asr  # noqa: F401

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


def run_cli_measured(*args: str, env: dict[str, str] | None = None, timeout: float = 300
                     ) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """`run_cli`, with the command's wall time in seconds and its peak resident memory in MiB (the kernel's
    own count for that one process, from wait4), to bound what a hostile input costs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        command = [str(Path(sys.executable).parent / "canary-convert"), *args]
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read().decode(), err.read().decode())
    return result, seconds, usage.ru_maxrss // 1024
