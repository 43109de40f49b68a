"""Give MLX's Linux CPU backend an optimised BLAS before MLX is loaded.

The `mlx[cpu]` Linux wheel links the netlib reference BLAS it bundles (`mlx_cpu.libs/libblas-*.so`);
its `cblas_sgemm` is about 20 times slower than OpenBLAS on a Conformer encoder. `libmlx.so` takes
`cblas_sgemm` and its LAPACK routines from whatever library defines them first in the process's global
symbol scope, so loading OpenBLAS there (RTLD_GLOBAL) before `mlx.core` is imported makes MLX use it.
Python imports extension modules with RTLD_NOW: once `mlx.core` is loaded its BLAS is fixed for the
life of the process, which is why this runs when `canary_convert` is imported, before any MLX import.

`CANARY_CONVERT_BLAS=reference` keeps MLX's bundled BLAS; `CANARY_CONVERT_BLAS=/path/to/libopenblas.so`
picks a library. By default the system's `libopenblas.so.0` is used (Debian and Ubuntu:
`libopenblas0-pthread`, which `make install` installs).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

ENV_VAR = "CANARY_CONVERT_BLAS"
OPT_OUT = "reference"
# The soname every OpenBLAS build carries; Debian's alternatives point it at the pthread variant.
DEFAULT_LIBRARY = "libopenblas.so.0"
REFERENCE = "reference BLAS bundled with mlx"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend multiplies with in this process, and why."""

    name: str  # "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." or REFERENCE
    library: str | None = None  # the file loaded, when one was
    threads: int | None = None
    reason: str = ""  # why the reference BLAS is in use

    def describe(self) -> str:
        if self.library is None:
            return f"{self.name} ({self.reason})" if self.reason else self.name
        return f"{self.name}, {self.threads} thread(s), {self.library}"


def _openblas_info(library: ctypes.CDLL, path: str) -> BlasInfo:
    library.openblas_get_config.restype = ctypes.c_char_p
    library.openblas_get_num_threads.restype = ctypes.c_int
    config = library.openblas_get_config().decode(errors="replace").strip()
    return BlasInfo(name=config, library=path, threads=library.openblas_get_num_threads())


def _loaded_path(library: ctypes.CDLL) -> str:
    """The file a handle was loaded from (dlopen by soname resolves through the linker's cache)."""
    address = ctypes.cast(library.openblas_get_config, ctypes.c_void_p).value
    for line in open("/proc/self/maps", encoding="utf-8", errors="replace"):
        fields = line.split()
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= (address or 0) < high and len(fields) >= 6:
            return fields[5]
    return library._name


def preload() -> BlasInfo:
    """Load OpenBLAS into the global symbol scope if MLX has not bound its BLAS yet; say what is in use."""
    if sys.platform != "linux":
        return BlasInfo(name="Accelerate" if sys.platform == "darwin" else "the platform's", reason="not Linux")
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice == OPT_OUT:
        return BlasInfo(name=REFERENCE, reason=f"{ENV_VAR}={OPT_OUT}")
    if "mlx.core" in sys.modules:
        return BlasInfo(name=REFERENCE, reason="mlx was imported before canary_convert; import canary_convert first")
    wanted = choice or DEFAULT_LIBRARY
    try:
        library = ctypes.CDLL(wanted, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        hint = "install libopenblas0-pthread (Debian/Ubuntu)" if not choice else f"{ENV_VAR}={choice} cannot be loaded"
        return BlasInfo(name=REFERENCE, reason=f"{wanted} not found: {hint}")
    try:
        return _openblas_info(library, _loaded_path(library))
    except AttributeError:
        # Another BLAS given by path: it is loaded and MLX will bind to it, but it cannot describe itself.
        return BlasInfo(name=os.path.basename(wanted), library=wanted)

