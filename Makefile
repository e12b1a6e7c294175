# Set-up and common jobs. Everything runs inside .venv, created by `make install`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The GPU machine has torch but no .venv: bench-gpu falls back to the system python3 there.
BENCH_PY := $(if $(wildcard $(PY)),$(PY),python3)

NGPU   ?= $(shell nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($$1 > 0) ? $$1 : 1}')

.PHONY: help install test train data speedrun bench bench-gpu gpu-check lint bundle
.DEFAULT_GOAL := help

help:
	@echo "make install   create .venv and install pinned requirements"
	@echo "make test      run the test suite (installs first if needed)"
	@echo "make train     train (CPU demo by default; see README for presets)"
	@echo "make data      download FineWeb: the val shard + 9 train shards (enough for the 124M speedrun)"
	@echo "make speedrun  make data, then the speedrun preset (record #46) on every visible GPU (torchrun)"
	@echo "make bench     CPU benchmarks (optimizer, tokenization, distributed sharding, the step's structure, host memory)"
	@echo "make bench-gpu the whole GPU benchmark in one command (ARGS=--smoke: toy sizes, runs on a CPU too)"
	@echo "make gpu-check record #46's speedrun schedule (or --preset speedrun-2025-07-12) compressed on one GPU (ARGS=\"--out-dir DIR [--preset P] [--smoke]\")"
	@echo "make lint      ruff check"
	@echo "make bundle    dist/train_gpt.py: train_gpt.py with its repo modules inlined (record submissions)"

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

train: $(STAMP)
	$(PY) train_gpt.py $(ARGS)

data: $(STAMP)
	$(PY) -m data.fineweb --train-shards 9

speedrun: data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPU) train_gpt.py --preset speedrun $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.optim --device cpu
	$(PY) -m bench.tokenize
	$(PY) -m bench.distributed
	$(PY) -m bench.structure
	$(PY) -m bench.host_memory

# One line instead of a traceback where that python has no torch (a fresh clone without .venv).
HAS_TORCH = $(BENCH_PY) -c 'import torch' 2>/dev/null || { echo "error: $(BENCH_PY) cannot import torch: run \`make install\` (or pip install -r requirements.txt) first" >&2; exit 1; }

bench-gpu:
	@$(HAS_TORCH)
	$(BENCH_PY) -m bench.gpu $(ARGS)

gpu-check:
	@$(HAS_TORCH)
	$(BENCH_PY) -m bench.gpu_check $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bundle: $(STAMP)
	$(PY) -m tools.bundle --out dist/train_gpt.py
