# The two commands: `make run` (daemon on built-in defaults) and `make test` (everything CI runs).
# Both bootstrap what they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/raafd serve

lint: $(VENV)/.installed
	$(BIN)/ruff check raafd tests $(wildcard bench)
	$(BIN)/ruff format --check raafd tests $(wildcard bench)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/stream_bench.py

clean:
	rm -rf $(VENV) var build *.egg-info .mypy_cache .ruff_cache
