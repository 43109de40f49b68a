"""Give MLX's Linux CPU backend an optimised BLAS before MLX is loaded.

The `mlx[cpu]` Linux wheel links the netlib reference BLAS it bundles (`mlx_cpu.libs/libblas-*.so`);
its `cblas_sgemm` is about 20 times slower than OpenBLAS on a Conformer encoder. `libmlx.so` takes
`cblas_sgemm` and its LAPACK routines from whatever library defines them first in the process's global
symbol scope, so loading OpenBLAS there (RTLD_GLOBAL) before `mlx.core` is imported makes MLX use it.
Python imports extension modules with RTLD_NOW: once `mlx.core` is loaded its BLAS is fixed for the
life of the process, which is why this runs when `canary_convert` is imported, before any MLX import.

MLX calls `cblas_sgemm` for every float32 product, the (1, K) x (K, N) ones of a decoder step included, and
OpenBLAS before 0.3.27 runs those at a third of the bandwidth its `cblas_sgemv` reaches. So a compiled
piece of the package, `_gemv_forward` (native/gemv_forward.c), is loaded into the global scope first: its
`cblas_sgemm` is the one MLX binds to, and it sends matrix-vector products to OpenBLAS's sgemv and the
rest to OpenBLAS's sgemm.

MLX imported first (`import mlx.core` before `import canary_convert`, as mlx-lm users write) keeps the
reference BLAS for good: rebinding `libmlx.so`'s resolved `cblas_sgemm` would mean patching its relocated,
read-only symbol table at run time, which we do not do. Instead the first model loaded warns
(`SlowBlasWarning`, once) and says what helps: import canary_convert first, or start Python with
`LD_PRELOAD=libopenblas.so.0`, which puts OpenBLAS in the global scope before MLX binds (then MLX uses it,
without the sgemv forwarding, and nothing is said).

`CANARY_CONVERT_BLAS=reference` keeps MLX's bundled BLAS (and silences the warning); `CANARY_CONVERT_BLAS=/path/to/libopenblas.so`
picks a library. By default the system's `libopenblas.so.0` is used (Debian and Ubuntu:
`libopenblas0-pthread`, which `make install` installs).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import SlowBlasWarning
from .extensions import extension_path

ENV_VAR = "CANARY_CONVERT_BLAS"
OPT_OUT = "reference"
# The soname every OpenBLAS build carries; Debian's alternatives point it at the pthread variant.
DEFAULT_LIBRARY = "libopenblas.so.0"
REFERENCE = "reference BLAS bundled with mlx"
TOO_LATE = "mlx was imported before canary_convert"


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend multiplies with in this process, and why."""

    name: str  # "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." or REFERENCE
    library: str | None = None  # the file loaded, when one was
    threads: int | None = None
    reason: str = ""  # why the reference BLAS is in use
    gemv_forward: str = ""  # "" when matrix-vector products go to sgemv, else why they do not

    def describe(self) -> str:
        if self.library is None:
            return f"{self.name} ({self.reason})" if self.reason else self.name
        products = "vector products by sgemv" if not self.gemv_forward else f"no sgemv forwarding: {self.gemv_forward}"
        return f"{self.name}, {self.threads} thread(s), {products}, {self.library}"


def gemv_forwarded() -> int:
    """How many products this process's MLX has sent to sgemv so far (0 where the forwarding is not loaded)."""
    forward = _forward_library()
    if forward is None:
        return 0
    forward.canary_gemv_forwarded.restype = ctypes.c_long
    return int(forward.canary_gemv_forwarded())


@functools.cache
def product_functions() -> tuple[int, int] | None:
    """The addresses of cblas_sgemv and cblas_sgemm in the optimised BLAS MLX multiplies with, if one was loaded:
    what the C kernels that multiply for themselves call (native/label_looping.c, native/rel_softmax.c)."""
    from . import BLAS

    if BLAS.library is None:
        return None
    try:
        library = ctypes.CDLL(BLAS.library)  # already in the process: the same handle
        return (ctypes.cast(library.cblas_sgemv, ctypes.c_void_p).value,
                ctypes.cast(library.cblas_sgemm, ctypes.c_void_p).value)
    except (OSError, AttributeError):
        return None


@functools.cache
def _openblas_threads() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    from . import BLAS

    if BLAS.library is None:
        return None
    try:
        library = ctypes.CDLL(BLAS.library)
        return library.openblas_get_num_threads, library.openblas_set_num_threads
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def one_thread_each() -> Iterator[bool]:
    """OpenBLAS kept to one thread for the block, so that each of several threads of ours can multiply on its own
    core at once (the attention's heads, native/rel_softmax.c); yields whether it was (False for another BLAS,
    which keeps its threading). Another thread multiplying meanwhile runs on one core too, no less exactly."""
    threads = _openblas_threads()
    if threads is None:
        yield False
        return
    get, set_threads = threads
    before = get()
    set_threads(1)
    try:
        yield True
    finally:
        set_threads(before)


def _forward_library() -> ctypes.CDLL | None:
    path = extension_path("_gemv_forward")
    if path is None:
        return None
    try:
        # RTLD_NOLOAD: a handle only if preload() already put the library in this process.
        return ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return None


def _forward_ahead_of(library: ctypes.CDLL) -> str:
    """Put the sgemv-forwarding cblas_sgemm into the global scope, bound to `library`; "" or why not.

    It is loaded only once both targets are known, since an unbound forwarder would be called by MLX.
    """
    path = extension_path("_gemv_forward")
    if path is None:
        return "the _gemv_forward extension was not built (no C compiler at install time)"
    try:
        sgemm, sgemv = library.cblas_sgemm, library.cblas_sgemv
    except AttributeError:
        return "the BLAS has no cblas_sgemv"
    try:
        forward = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        return f"{path.name} cannot be loaded: {error}"
    forward.canary_gemv_bind(ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(sgemv, ctypes.c_void_p))
    return ""


def _openblas_info(library: ctypes.CDLL, path: str, gemv_forward: str) -> BlasInfo:
    library.openblas_get_config.restype = ctypes.c_char_p
    library.openblas_get_num_threads.restype = ctypes.c_int
    config = library.openblas_get_config().decode(errors="replace").strip()
    return BlasInfo(name=config, library=path, threads=library.openblas_get_num_threads(), gemv_forward=gemv_forward)


def _loaded_path(function: ctypes._CFuncPtr, fallback: str) -> str:
    """The file a function was loaded from (dlopen by soname resolves through the linker's cache)."""
    address = ctypes.cast(function, ctypes.c_void_p).value
    for line in open("/proc/self/maps", encoding="utf-8", errors="replace"):
        fields = line.split()
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= (address or 0) < high and len(fields) >= 6:
            return fields[5]
    return fallback


def _bound_before_us() -> BlasInfo:
    """What MLX bound when it was loaded before us: a BLAS already in the global scope then (LD_PRELOAD, or
    loaded RTLD_GLOBAL by an earlier import) comes before MLX's own, else MLX has its bundled reference BLAS."""
    try:
        sgemm = ctypes.CDLL(None).cblas_sgemm  # dlopen(NULL): the global scope, in load order
    except AttributeError:
        return BlasInfo(name=REFERENCE, reason=TOO_LATE)
    path = _loaded_path(sgemm, "cblas_sgemm's library")
    try:
        return _openblas_info(ctypes.CDLL(path), path, f"{TOO_LATE}; the BLAS was in the global scope before it")
    except (AttributeError, OSError):
        return BlasInfo(name=os.path.basename(path), library=path, gemv_forward=TOO_LATE)


_warned = False


def warn_if_slow(stacklevel: int = 3) -> None:
    """Warn once per process, when a model is about to run on MLX's reference BLAS by accident, what to do."""
    global _warned
    from . import BLAS

    if _warned or BLAS.name != REFERENCE or BLAS.reason == f"{ENV_VAR}={OPT_OUT}":
        return
    _warned = True
    warnings.warn(SlowBlasWarning(
        f"MLX multiplies with its reference BLAS in this process ({BLAS.reason}): a Conformer encoder runs about "
        f"20 times slower. Import canary_convert before mlx, or start Python with LD_PRELOAD={DEFAULT_LIBRARY} "
        f"(e.g. `LD_PRELOAD={DEFAULT_LIBRARY} python script.py`); {ENV_VAR}={OPT_OUT} keeps it and silences this."),
        stacklevel=stacklevel)


def preload() -> BlasInfo:
    """Load OpenBLAS into the global symbol scope if MLX has not bound its BLAS yet; say what is in use."""
    if sys.platform != "linux":
        return BlasInfo(name="Accelerate" if sys.platform == "darwin" else "the platform's", reason="not Linux")
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice == OPT_OUT:
        return BlasInfo(name=REFERENCE, reason=f"{ENV_VAR}={OPT_OUT}")
    if "mlx.core" in sys.modules:
        return _bound_before_us()
    wanted = choice or DEFAULT_LIBRARY
    try:
        library = ctypes.CDLL(wanted, mode=ctypes.RTLD_LOCAL)
    except OSError:
        hint = "install libopenblas0-pthread (Debian/Ubuntu)" if not choice else f"{ENV_VAR}={choice} cannot be loaded"
        return BlasInfo(name=REFERENCE, reason=f"{wanted} not found: {hint}")
    # The global scope is searched in load order: the forwarding cblas_sgemm goes in before the BLAS's own.
    gemv_forward = _forward_ahead_of(library)
    library = ctypes.CDLL(wanted, mode=ctypes.RTLD_GLOBAL)
    try:
        return _openblas_info(library, _loaded_path(library.openblas_get_config, library._name), gemv_forward)
    except AttributeError:
        # Another BLAS given by path: it is loaded and MLX will bind to it, but it cannot describe itself.
        return BlasInfo(name=os.path.basename(wanted), library=wanted, gemv_forward=gemv_forward)

