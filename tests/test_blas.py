"""MLX's CPU backend multiplies with OpenBLAS once canary_convert is imported, and the opt-outs hold.

The dynamic linker itself says which library `libmlx.so`'s `cblas_sgemm` was bound to (LD_DEBUG=bindings):
the package's sgemv forwarder, which passes every product on to OpenBLAS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from canary_convert.convert import ConvertOptions, convert
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


def test_mlx_binds_the_forwarder_to_openblas_when_canary_convert_comes_first() -> None:
    import canary_convert
    from canary_convert.extensions import extension_path

    bound, library = _bound_blas("import canary_convert, mlx.core; print(canary_convert.BLAS.library)")
    forwarder = extension_path("_gemv_forward")
    assert forwarder is not None and bound == forwarder.resolve()
    assert "openblas" in Path(library).name
    assert canary_convert.BLAS.gemv_forward == ""


# Every way MLX can hand cblas_sgemm a matrix-vector product: a (1, K) row against a plain or transposed
# matrix, a transposed (K, 1) column as the row, and (M, K) or transposed matrices against a column; and
# one product of two rows, which stays with sgemm. The flag says whether sgemv should take it.
PRODUCTS = {
    "row @ matrix.T": (lambda row, rows, column, matrix: row @ matrix.T, True),
    "row @ matrix": (lambda row, rows, column, matrix: row @ matrix.T.reshape(67, 45), True),
    "column.T @ matrix.T": (lambda row, rows, column, matrix: column.T @ matrix.T, True),
    "matrix @ column": (lambda row, rows, column, matrix: matrix @ column, True),
    "transposed matrix @ column": (lambda row, rows, column, matrix: matrix.T.reshape(67, 45).T @ column, True),
    "matrix @ row.T": (lambda row, rows, column, matrix: matrix @ row.T, True),
    "rows @ matrix.T": (lambda row, rows, column, matrix: rows @ matrix.T, False),
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_vector_products_go_to_sgemv_with_the_same_values(name: str) -> None:
    import mlx.core as mx
    import numpy as np

    from canary_convert.blas import gemv_forwarded

    product, forwarded = PRODUCTS[name]
    rng = np.random.default_rng(0)
    row, rows = rng.standard_normal((1, 67)), rng.standard_normal((2, 67))
    column, matrix = rng.standard_normal((67, 1)), rng.standard_normal((45, 67))
    before = gemv_forwarded()
    got = product(*(mx.array(value.astype(np.float32)) for value in (row, rows, column, matrix)))
    mx.eval(got)
    assert gemv_forwarded() - before == (1 if forwarded else 0)
    np.testing.assert_allclose(np.array(got), product(row, rows, column, matrix), rtol=1e-5, atol=1e-5)


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
    assert re.search(r"^blas: OpenBLAS \d+\.\d+\.\d+ .*, \d+ thread\(s\), vector products by sgemv, /", result.stdout, re.MULTILINE), result.stdout


@pytest.fixture(scope="module")
def converted(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(str(checkpoint), tmp_path_factory.mktemp("blas") / "mlx", ConvertOptions()).out


@pytest.mark.parametrize(("imports", "env", "warns"), [
    ("import mlx.core, canary_convert", {}, True),  # mlx-lm's order: the reference BLAS, said once
    ("import canary_convert, mlx.core", {}, False),
    ("import mlx.core, canary_convert", {"CANARY_CONVERT_BLAS": "reference"}, False),  # asked for
    ("import mlx.core, canary_convert", {"LD_PRELOAD": "libopenblas.so.0"}, False),  # the advice, taken
], ids=["mlx-first", "canary-convert-first", "opted-out", "ld-preload"])
def test_a_model_on_the_reference_blas_by_accident_warns_once(converted: Path, imports: str, env: dict[str, str],
                                                             warns: bool) -> None:
    code = (f"{imports}; from canary_convert import load_model; "
            f"load_model({str(converted)!r}); load_model({str(converted)!r}); print(canary_convert.BLAS.describe())")
    bound, described = _bound_blas(code, **env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("SlowBlasWarning") == (1 if warns else 0), result.stderr
    if warns:
        assert "mlx was imported before canary_convert" in result.stderr
        assert "Import canary_convert before mlx, or start Python with LD_PRELOAD=libopenblas.so.0" in result.stderr
        assert bound.parent.name == "mlx_cpu.libs"
    if "LD_PRELOAD" in env:  # MLX bound to OpenBLAS itself, and says so
        assert "openblas" in bound.name and described.startswith("OpenBLAS")
        assert "no sgemv forwarding: mlx was imported before canary_convert" in described


def test_openblas_is_kept_to_one_thread_only_for_the_block() -> None:
    """The attention's heads multiply side by side inside `one_thread_each`; OpenBLAS's threading is back after."""
    import ctypes

    import canary_convert
    from canary_convert.blas import one_thread_each

    library = ctypes.CDLL(canary_convert.BLAS.library)
    before = library.openblas_get_num_threads()
    with pytest.raises(RuntimeError), one_thread_each() as kept:
        assert kept and library.openblas_get_num_threads() == 1
        raise RuntimeError  # restored on the way out of an error too
    assert library.openblas_get_num_threads() == before
