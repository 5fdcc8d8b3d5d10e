# Everything runs inside .venv, created from nothing by the first target that needs it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,dali,deepspeed,gpu
# the extras in the stamp's name: a venv made with other extras is brought up to these
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: venv demo test test-fast lint bench oracle clean gpu-wheels gpu-check gpu-check-dry

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU-only machines: take the CPU build first (PyPI's torch is the multi-GB CUDA build), from torch's CPU
	# index; where that index cannot be reached (an offline mirror), from the configured index. The short
	# timeout keeps an unreachable index from costing minutes.
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 || \
	  $(BIN)/pip install -q torch==2.13.0; fi
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

# ---- the GPU machine (issue 16): no network there, torch preinstalled, pydantic not. -------------
# `make gpu-wheels` (here, with network) downloads the wheels `import launcher` needs beyond what the
# GPU machine has into .whl/ (git-ignored; send it along with the working tree). Versions are the images'
# (docker/requirements.lock, docker/requirements-gpu.lock); typing-extensions because pydantic needs a
# newer one than torch may bring.
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/site
GPU_WHEELS := $(shell grep -E '^(pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions|tqdm)==' \
	docker/requirements.lock) \
	$(shell grep -E '^(einops|hjson|msgpack|ninja|psutil|py-cpuinfo)==' docker/requirements-gpu.lock)
GPU_DEEPSPEED := $(shell grep -E '^deepspeed==' docker/requirements-gpu.lock)

# DeepSpeed (and, above, what it imports) for gpu-check's ZeRO step. It is published as source only, so it
# is built here into a pure-Python wheel without its compiled ops (DS_BUILD_OPS=0: ZeRO-1/2 with torch's
# optimizers needs none); its setup.py imports torch, hence this venv and no build isolation.
gpu-wheels: $(STAMP)
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl $(GPU_DEEPSPEED)

# On the GPU machine: install the carried wheels into $(GPU_SITE) (no index, no build), then run the
# check with the repository on PYTHONPATH (the project itself is not installed there). Figures and
# log go to $$OUT (or runs/gpu-check). GPU_CHECK_ARGS: e.g. --only bench_head, --budget-s 300.
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(GPU_SITE) .whl/*.whl || \
	  { echo "gpu-check: pip install failed; unpacking the wheels into $(GPU_SITE) instead"; \
	    for w in .whl/*.whl; do $(GPU_PYTHON) -m zipfile -e "$$w" $(GPU_SITE) || exit 1; done; }; \
	else echo "gpu-check: no wheels in .whl/ (make gpu-wheels): using what $(GPU_PYTHON) has"; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

# The same steps on the CPU at tiny sizes, in this project's venv (tests/launcher/bench/test_gpu_check.py
# runs it too). `make gpu-check DRY_RUN=1` does the same with $(GPU_PYTHON).
gpu-check-dry:
	PYTHONPATH=$(CURDIR) $(BIN)/python scripts/gpu_check.py --dry-run --out runs/gpu-check-dry $(GPU_CHECK_ARGS)
