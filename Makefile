# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
# Python 3.12 is required (JAX 0.11.2); on this project's machines it lives under pyenv, not on PATH.
# A pyenv shim named python3.12 may exist yet fail ("command not found" for the active version), so each
# candidate must actually run before it is taken.
PYTHON ?= $(shell for p in "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python" python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
# One venv outside the checkout, so torch (CPU use in tests only, a large wheel) installs once and is reused
# by every clone, CI's included.
VENV ?= $(HOME)/.cache/jaxsloth/venv312
BIN := $(VENV)/bin

.PHONY: install test demo lint demo-bare

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (e.g. pyenv install 3.12.1) or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The package alone, without the test extras (which would bring in anything it forgot to declare), must run the
# demo: a fresh venv each time, so a dependency dropped from pyproject.toml cannot hide in an old one.
BARE_VENV ?= $(HOME)/.cache/jaxsloth/venv312-bare
demo-bare:
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (e.g. pyenv install 3.12.1) or pass PYTHON=/path/to/python3.12"; exit 1; }
	rm -rf $(BARE_VENV)
	$(PYTHON) -m venv $(BARE_VENV)
	$(BARE_VENV)/bin/pip install -q --upgrade pip
	$(BARE_VENV)/bin/pip install -q .
	cd $$(mktemp -d) && JAX_PLATFORMS=cpu $(BARE_VENV)/bin/jaxsloth demo --steps 3 --output-dir demo-out

test: lint demo-bare
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --timeout=900 $(PYTEST_ARGS)

demo: $(BIN)/python
	$(BIN)/pip install -q -e .
	JAX_PLATFORMS=cpu $(BIN)/jaxsloth demo
