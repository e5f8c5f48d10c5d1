# The two commands of the README's quick start:
#   make demo   the whole product in miniature on synthetic SOP-format data (CPU ok, GPU if present)
#   make demo-long   the same, trained ~25 min on 2 CPU cores: long enough for search to find the product
#   make faults   kill/resume campaigns: training, index build, concurrent embeds (not in the default suite)
#   make test   install into .venv and run the default test suite
#   make bench-scale   the catalogue-scale benchmark (100k and 1M x 256 embeddings; about 10 min on 2 cores)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A matching torch/torchvision pair (timm imports torchvision). On CPU machines like the CI's these
# come from the local wheel cache; GPU hosts: install your CUDA torch into the venv first and run
# `make install TORCH_PIN=` (README: "Installing on a GPU host").
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test test-all lint demo demo-long clean-demo faults bench-scale

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ -n "$(TORCH_PIN)" ]; then $(BIN)/pip install -q $(TORCH_PIN); fi
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# everything but gpu: slow and browser tests included
test-all: install
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check retrieval tests && $(BIN)/ruff format --check retrieval tests

# fault campaigns (~15 min each on 2 CPU cores): SIGKILL a 2-process tiny run at 20 instants, resume, compare;
# SIGKILL index builds (plain, auto) at 20 instants each and race two embeds into one folder, read what is left
faults: install
	$(BIN)/python bench/faults.py --trials 20
	$(BIN)/python bench/faults_folders.py --trials 20 --update-trials 20 --embed-trials 10

demo: install
	$(BIN)/python -m retrieval demo

demo-long: install
	$(BIN)/python -m retrieval demo --config configs/demo_long.yaml --classes 2700 --train-classes 2400 \
		--query-views 2 --out runs/demo-long

bench-scale: install
	$(BIN)/python -m bench.scale --out bench-out/scale

clean-demo:
	rm -rf runs/demo runs/demo-long
