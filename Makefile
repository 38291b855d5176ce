# Two commands do everything on a fresh machine with Python 3.11+, git and make:
#   make repro   # the DVC pipeline on the built-in demo set
#   make test    # the test suite (slow tests: make test-slow)
# Each target creates .venv from the pinned lock file when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv repro test test-slow test-all lock clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest

# Re-pin after changing dependencies in pyproject.toml (run inside an up-to-date .venv).
lock:
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v -E '^(pip|audiocnn)==' > requirements.lock

clean-venv:
	rm -rf $(VENV)
