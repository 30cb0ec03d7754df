# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs. torch (tests only) must be the CPU build: set PIP_TORCH_ARGS, e.g.
# PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu", where the default index
# would give the CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_TORCH_ARGS ?=

.PHONY: demo test clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q torch==2.13.0 $(PIP_TORCH_ARGS)
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/jft demo --out out/demo

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) out
