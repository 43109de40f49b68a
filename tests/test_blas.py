"""MLX's CPU backend multiplies with OpenBLAS once canary_convert is imported, and the opt-outs hold.

The dynamic linker itself says which library `libmlx.so`'s `cblas_sgemm` was bound to (LD_DEBUG=bindings).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap concerns MLX's Linux wheel only")

_BINDING = re.compile(r"binding file (\S*libmlx\.so) \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'")


def _bound_blas(code: str, **env: str) -> tuple[Path, str]:
    """Run `code` in a fresh interpreter; the file libmlx's cblas_sgemm was bound to, and what it printed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "LD_DEBUG": "bindings", **env})
    bindings = _BINDING.findall(result.stderr)
    assert len(bindings) == 1, result.stderr[-2000:]
    return Path(bindings[0][1]).resolve(), result.stdout.strip()


def test_mlx_binds_openblas_when_canary_convert_comes_first() -> None:
    bound, library = _bound_blas("import canary_convert, mlx.core; print(canary_convert.BLAS.library)")
    assert "openblas" in bound.name
    assert bound == Path(library).resolve()


@pytest.mark.parametrize(
    ("code", "env", "reason"),
    [
        ("import canary_convert, mlx.core", {"CANARY_CONVERT_BLAS": "reference"}, "CANARY_CONVERT_BLAS=reference"),
        ("import mlx.core, canary_convert", {}, "mlx was imported before canary_convert"),
    ],
)
def test_reference_blas_when_asked_or_too_late(code: str, env: dict[str, str], reason: str) -> None:
    bound, described = _bound_blas(code + "; print(canary_convert.BLAS.describe())", **env)
    assert bound.parent.name == "mlx_cpu.libs" and bound.name.startswith("libblas")
    assert described.startswith("reference BLAS") and reason in described


def test_version_names_the_blas() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^blas: OpenBLAS \d+\.\d+\.\d+ .*, \d+ thread\(s\), /", result.stdout, re.MULTILINE), result.stdout
