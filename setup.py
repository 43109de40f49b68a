"""The one compiled piece: on Linux, a cblas_sgemm that forwards matrix-vector products to sgemv (blas.py).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the package
still installs, and `canary-convert --version` says the forwarding is missing.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform == "linux":
    extensions.append(Extension("canary_convert._gemv_forward", ["converter/native/gemv_forward.c"],
                                extra_compile_args=["-O2"], optional=True))

setup(ext_modules=extensions)
