"""Where the package's optional compiled pieces are (setup.py builds them on Linux when a C compiler is
there): plain shared libraries beside this file, read with ctypes, not Python modules."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path


def extension_path(name: str) -> Path | None:
    """The built extension `name` (e.g. "_widen") beside this file, if the install compiled it."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{name}{suffix}").is_file():
            return here / f"{name}{suffix}"
    return None
