# Everything a fresh machine needs, installed by the project itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
DEMO   := build/demo

.PHONY: test demo install dev clean

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

# Until the trained example model lands, the demo converts a tiny random checkpoint built with NeMo.
demo: $(VENV)/.dev
	mkdir -p $(DEMO)
	$(BIN)/python tests/factory.py $(DEMO)/tiny-canary.nemo
	$(BIN)/canary-convert $(DEMO)/tiny-canary.nemo --dry-run
	$(BIN)/canary-convert $(DEMO)/tiny-canary.nemo $(DEMO)/tiny-canary-mlx --force
	cat $(DEMO)/tiny-canary-mlx/conversion.json

clean:
	rm -rf build dist *.egg-info .pytest_cache
