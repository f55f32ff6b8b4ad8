# The two commands: `make run` (daemon on built-in defaults) and `make test` (everything CI runs).
# Both bootstrap what they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: help run test lint typecheck pytest browser bench autobahn clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime dependencies only (make run); the test extras on top (everything else).
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime  ## the daemon on its built-in defaults (open http://127.0.0.1:8080/)
	$(BIN)/raafd serve

lint: $(VENV)/.installed  ## ruff check and format check
	$(BIN)/ruff check raafd tests $(wildcard bench)
	$(BIN)/ruff format --check raafd tests $(wildcard bench)

typecheck: $(VENV)/.installed  ## mypy strict
	$(BIN)/mypy

pytest: $(VENV)/.installed browser  ## the test suite
	$(BIN)/pytest

# The web chat's tests drive Debian's chromium; installed when missing and we may (root with
# apt-get), else those tests are skipped and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		     || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } \
		|| echo "chromium is not installed: the web chat's browser tests will be skipped"; }

test: lint typecheck pytest  ## everything CI runs: lint, typecheck, the suite

bench: $(VENV)/.installed  ## the stream benchmark (prints figures)
	$(BIN)/python bench/stream_bench.py

# Autobahn|Testsuite (Python 2.7, installed into .autobahn/venv on first use): groups 1-10
# against websocket.echo_path of a raafd of its own; fails on any FAILED case.
autobahn: $(VENV)/.installed  ## WebSocket conformance: Autobahn|Testsuite 1.*-10.*
	$(BIN)/python bench/autobahn.py $(AUTOBAHN_ARGS)

clean:  ## remove the venv, state and caches
	rm -rf $(VENV) var build *.egg-info .mypy_cache .ruff_cache test-artifacts .autobahn
