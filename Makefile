# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
# Python 3.12 is required (JAX 0.11.2); on this project's machines it lives under pyenv, not on PATH.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || (pyenv prefix 3.12.1 2>/dev/null | sed 's|$$|/bin/python|') || echo python3.12)
# One venv outside the checkout, so torch (CPU use in tests only, a large wheel) installs once and is reused
# by every clone, CI's included.
VENV ?= $(HOME)/.cache/jaxsloth/venv312
BIN := $(VENV)/bin

.PHONY: install test demo lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --timeout=900 $(PYTEST_ARGS)

demo: $(BIN)/python
	$(BIN)/pip install -q -e .
	JAX_PLATFORMS=cpu $(BIN)/jaxsloth demo
