# Everything a fresh machine needs, installed by the project itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
DEMO   := build/demo

.PHONY: test demo bench install dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The runtime alone (no NeMo); torch comes from the pinned CPU wheel.
$(VENV)/.runtime: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

# Runtime plus pytest, hypothesis and NeMo (the reference the tests compare against).
$(VENV)/.dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
dev: $(VENV)/.dev

test: $(VENV)/.dev
	$(BIN)/python -m pytest

# Until the trained example model lands, the demo converts a tiny random checkpoint built with NeMo,
# proves it against NeMo (--parity) and transcribes a synthetic clip (random weights: the text is noise).
demo: $(VENV)/.dev
	mkdir -p $(DEMO)
	$(BIN)/python tests/factory.py $(DEMO)/tiny-canary.nemo > $(DEMO)/factory.log 2>&1
	$(BIN)/canary-convert $(DEMO)/tiny-canary.nemo --dry-run | tail -n 4
	$(BIN)/canary-convert $(DEMO)/tiny-canary.nemo $(DEMO)/tiny-canary-mlx --force --parity
	$(BIN)/python -c "import soundfile; from canary_convert.parity import reference_signals; \
		soundfile.write('$(DEMO)/signal.wav', reference_signals(16000)[0], 16000)"
	$(BIN)/canary-transcribe $(DEMO)/signal.wav --model $(DEMO)/tiny-canary-mlx

# Figures, not tests: conversion speed and memory, transcription speed, on a canary-180m-flash-sized model.
bench: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_convert.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
