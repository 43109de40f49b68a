# Everything a fresh machine needs, installed by the project itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
DEMO   := build/demo
EXAMPLE := examples/tiny-canary
PARAKEET := examples/tiny-parakeet

.PHONY: test demo example example-parakeet bench install install-runtime dev clean blas

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# MLX's Linux wheel multiplies with the reference BLAS it bundles; canary_convert loads the system's
# OpenBLAS in its place (converter/blas.py), about 20x faster. PyPI has no OpenBLAS that loads without the
# system's libgfortran and runs on every x86_64 CPU, so it comes from Debian/Ubuntu's libopenblas0-pthread.
# The install also compiles converter/native/gemv_forward.c, which sends MLX's matrix-vector products to
# OpenBLAS's sgemv (3x the decoder's speed with OpenBLAS 0.3.21), converter/native/widen.c (float16
# widened by F16C for the goldens) and the encoder's kernels for x86 (converter/native/subsample.c,
# rel_softmax.c, activations.c, conv_module.c,
# layer_norm.c: vectorised and threaded), so Linux needs a C compiler too.
blas:
	@if [ "$$(uname -s)" = Linux ]; then \
	  missing=""; \
	  /sbin/ldconfig -p | grep -q 'libopenblas\.so\.0 ' || missing="libopenblas0-pthread"; \
	  command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	  if [ -z "$$missing" ]; then :; \
	  elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	  else \
	    echo "note: install $$missing (Debian/Ubuntu) for a fast MLX CPU backend"; \
	  fi; \
	fi

# The runtime alone: load, transcribe, verify and upload converted folders (no torch, no NeMo), with mlx-lm for
# the speech-LLM families.
$(VENV)/.runtime: pyproject.toml setup.py $(wildcard converter/native/*.c) constraints.txt | $(BIN)/python blas
	$(PIP) -e '.[llm]'
	touch $@

# The runtime and the converter (the `convert` extra); torch comes from the pinned CPU wheel.
$(VENV)/.convert: pyproject.toml setup.py $(wildcard converter/native/*.c) constraints.txt | $(BIN)/python blas
	$(PIP) -e '.[convert,llm]'
	touch $@ $(VENV)/.runtime

# The converter plus pytest, hypothesis and NeMo (the reference the tests compare against).
$(VENV)/.dev: pyproject.toml setup.py $(wildcard converter/native/*.c) constraints.txt | $(BIN)/python blas
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.convert $(VENV)/.runtime

install: $(VENV)/.convert
install-runtime: $(VENV)/.runtime
dev: $(VENV)/.dev

test: $(VENV)/.dev
	$(BIN)/python -m pytest

# The example model (trained by examples/train_tiny_canary.py, committed): convert it, validate it,
# transcribe its clips with canary-transcribe beside the references, then a 3-minute recording per language
# made of those clips (written to build/demo, with its subtitles), and print the WERs. Then the example
# Parakeet (examples/train_tiny_parakeet.py), in float32 and 8 bits, on the same clips with each head.
# Needs the converter, not NeMo.
demo: $(VENV)/.convert
	mkdir -p $(DEMO)
	$(BIN)/canary-convert $(EXAMPLE)/tiny-canary.nemo $(DEMO)/tiny-canary-mlx --force
	$(BIN)/python examples/demo.py $(DEMO)/tiny-canary-mlx $(EXAMPLE) $(DEMO)
	$(BIN)/canary-convert $(PARAKEET)/tiny-parakeet.nemo $(DEMO)/tiny-parakeet-mlx --force
	$(BIN)/canary-convert $(PARAKEET)/tiny-parakeet.nemo $(DEMO)/tiny-parakeet-mlx-8bit --force --quantize 8
	$(BIN)/python examples/demo_parakeet.py $(DEMO)/tiny-parakeet-mlx $(DEMO)/tiny-parakeet-mlx-8bit $(EXAMPLE)

# Retrain the example model (about 25 minutes on 2 cores); needs espeak-ng and NeMo.
example: $(VENV)/.dev
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	$(BIN)/python examples/train_tiny_canary.py $(EXAMPLE)

# Retrain the example Parakeet (heads on the example Canary's encoder, about 3 minutes on 2 cores).
example-parakeet: $(VENV)/.dev
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	$(BIN)/python examples/train_tiny_parakeet.py $(PARAKEET)

# Figures, not tests: conversion, memory, load, encoder and decoder speed beside NeMo's, on checkpoints with
# each family's real shapes (built once into build/bench/). FAMILIES=canary-180m-flash,canary-1b and
# OUTPUTS=float32 pick some; all by default.
# OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE, which some machines set for old OpenBLAS builds, pin a slower kernel:
# the benchmark runs without them, as on a user's machine, and prints the kernel OpenBLAS chose.
FAMILIES ?=
OUTPUTS ?=
bench: $(VENV)/.dev
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench.py $(if $(FAMILIES),--families $(FAMILIES)) $(if $(OUTPUTS),--outputs $(OUTPUTS))

clean:
	rm -rf build dist *.egg-info .pytest_cache
