# Everything runs inside .venv, created from nothing by the first target that needs it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,dali,deepspeed
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench oracle clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU-only machines: take the CPU build first so the torch range never resolves to a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pfc demo

test: $(STAMP) oracle
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not multiprocess and not oracle" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pfc bench head --classes 100000 --dim 512 --batch 128 --sample-rate 0.1 --world-size 2 --steps 5

# MXNet is only a test oracle: it needs numpy<1.24, so it lives in its own environment.
# A failed build leaves no .venv-mxnet; oracle tests then skip and say why.
oracle: .venv-mxnet/.installed

.venv-mxnet/.installed:
	( $(PYTHON) -m venv .venv-mxnet && \
	  .venv-mxnet/bin/pip install -q 'mxnet==1.9.1' 'numpy<1.24' opencv-python-headless && \
	  .venv-mxnet/bin/python -c 'import mxnet' && touch $@ ) || \
	  ( echo "warning: MXNet oracle environment could not be built; oracle tests will skip"; rm -rf .venv-mxnet )

clean:
	rm -rf $(VENV) .venv-mxnet
