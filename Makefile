# Set-up and common jobs. Everything runs inside .venv, created by `make install`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test train lint
.DEFAULT_GOAL := help

help:
	@echo "make install   create .venv and install pinned requirements"
	@echo "make test      run the test suite (installs first if needed)"
	@echo "make train     train (CPU demo by default; see README for presets)"
	@echo "make lint      ruff check"

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

train: $(STAMP)
	$(PY) train_gpt.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
