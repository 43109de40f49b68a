"""Where the package's optional compiled pieces are (setup.py builds them on Linux when a C compiler is
there): plain shared libraries beside this file, read with ctypes, not Python modules."""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# The C kernels' array arguments.
FLOATS = ctypes.POINTER(ctypes.c_float)
INTS = ctypes.POINTER(ctypes.c_int)


def extension_path(name: str) -> Path | None:
    """The built extension `name` (e.g. "_widen") beside this file, if the install compiled it."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{name}{suffix}").is_file():
            return here / f"{name}{suffix}"
    return None


def pointer(array: np.ndarray, kind: type = FLOATS) -> ctypes._Pointer:
    """A contiguous numpy array's data as a C pointer argument (it keeps the array alive)."""
    return array.ctypes.data_as(kind)
