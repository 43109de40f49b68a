"""The compiled pieces, on Linux: a cblas_sgemm that forwards matrix-vector products to sgemv (blas.py),
float16 weights widened with F16C (model/mapped.py) and the encoder's subsampling convolutions, attention
softmax, SiLU, GLU, conv module and LayerNorm (model/cpu/native.py), and the transducers' greedy decoding loop
(model/cpu/label_looping.py). All are plain shared libraries read with ctypes.

Everything else is declared in pyproject.toml. The extensions are optional: without a C compiler the package
still installs, `canary-convert --version` says the forwarding is missing, and widening falls back to numpy.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform == "linux":
    extensions.append(Extension("canary_convert._gemv_forward", ["converter/native/gemv_forward.c"],
                                extra_compile_args=["-O2"], optional=True))
    extensions.append(Extension("canary_convert._widen", ["converter/native/widen.c"],
                                extra_compile_args=["-O2"], optional=True))
    encoder_kernels = ["subsample", "rel_softmax", "activations", "conv_module", "layer_norm"]
    extensions.append(Extension("canary_convert._encoder", [f"converter/native/{name}.c" for name in encoder_kernels],
                                depends=["converter/native/vector_exp.h", "converter/native/parallel.h"],
                                extra_compile_args=["-O3"], extra_link_args=["-lpthread"], optional=True))
    extensions.append(Extension("canary_convert._label_looping", ["converter/native/label_looping.c"],
                                depends=["converter/native/vector_exp.h", "converter/native/parallel.h"],
                                extra_compile_args=["-O3"], extra_link_args=["-lm"], optional=True))

setup(ext_modules=extensions)
