# Setup, demo and tests for a fresh clone. Everything installs into .venv from the project's own files.
PYTHON ?= python3
# The CPU build of torch (on disk on our CI machines); override e.g. TORCH='torch' for a CUDA build.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Ham.

.PHONY: setup data demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(BIN)/python sample_data/build.py

demo: data
	$(BIN)/lmkit pretrain sample_data/shakespeare_train.txt -p demo
	$(BIN)/lmkit eval sample_data/shakespeare_heldout.txt -p demo
	$(BIN)/lmkit generate -p demo --seed 1 --max-new-tokens 120 "$(PROMPT)"

test: data
	$(BIN)/python -m pytest
