PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config

.PHONY: run test lint bench check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python examples/run_with_upstream.py --config $(CONFIG)

check: $(VENV)/.installed
	$(BIN)/gateway check --config $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gateway tests examples bench
	$(BIN)/ruff format --check gateway tests examples bench
	$(BIN)/mypy --strict gateway

bench: $(VENV)/.installed
	$(BIN)/python bench/run.py
	$(BIN)/python bench/edge.py

clean:
	rm -rf $(VENV) build *.egg-info
