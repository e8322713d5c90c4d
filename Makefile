# The README's two commands: `make smoke` (set up + run the main job offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOKE_DIR ?= runs/smoke
SMOKE_ARGS ?=
# libtpu, the TPU compiler of the pre-flight (python -m mcpf_jax.aot, tests/test_aot.py), lives here: in the venv's
# folder but outside its site-packages. Importable, jax would start it as a backend in every command of the venv
# (score.py, train.py, ...), each then printing libtpu's errors about the TPU a CPU machine does not have;
# mcpf_jax.aot finds it here by itself. The version is the one the installed jax's `tpu` extra pins.
AOT_LIBTPU := $(VENV)/aot-libtpu

.PHONY: setup setup-test aot-libtpu smoke lint test

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

define install_aot_libtpu
	$(PY) -m pip uninstall -qq -y libtpu  # a venv made before this layout has it in site-packages
	rm -rf $(AOT_LIBTPU)
	$(PY) -m pip install -q --no-deps --target $(AOT_LIBTPU) \
	  "$$($(PY) -c 'from mcpf_jax.aot import libtpu_requirement; print(libtpu_requirement())')"
endef

$(VENV)/.test: requirements-test.txt requirements-demo.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0 jax2onnx==0.17.1 gradio==6.31.0
	$(install_aot_libtpu)
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test
aot-libtpu: $(VENV)/.runtime
	$(install_aot_libtpu)

smoke: setup
	$(PY) train.py --config configs/smoke.py --workdir $(SMOKE_DIR) $(SMOKE_ARGS)
	$(PY) eval.py --config configs/smoke.py --workdir $(SMOKE_DIR) $(SMOKE_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -n 2 --dist loadfile -q --durations=15 tests
