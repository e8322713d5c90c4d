# The README's two commands: `make smoke` (set up + run the main job offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOKE_DIR ?= runs/smoke
SMOKE_ARGS ?=

.PHONY: setup setup-test smoke lint test

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

smoke: setup
	$(PY) train.py --config configs/smoke.py --workdir $(SMOKE_DIR) $(SMOKE_ARGS)
	$(PY) eval.py --config configs/smoke.py --workdir $(SMOKE_DIR) $(SMOKE_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -n 2 --dist loadfile -q --durations=15 tests
