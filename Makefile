# The README's two commands. Both create .venv on first use and work on a fresh machine (CPU is enough).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Set up and run the main job on the embedded default (no downloads at run time).
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/openr1-jax demo

# Set up and run the whole test suite (slow tests included), then lint.
test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pytest -q -n 2  # two workers: tests/scheduling.py
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lint: $(BIN)/python
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
