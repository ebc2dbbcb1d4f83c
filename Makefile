# Targets people already know: setup, test, lint, demo (plus bench and clean).
# Everything runs in .venv, created on first use with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
WEIGHTS_FILE := mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
# "imagenet" uses (and fills) the Keras cache; a machine without internet can use the
# shared copy of the weights when it sits beside the checkout.
WEIGHTS ?= $(if $(wildcard $(SHARED)/models/$(WEIGHTS_FILE)),$(SHARED)/models/$(WEIGHTS_FILE),imagenet)
SAMPLE ?= data/sample
OUTPUT ?= output/sample
PYTEST_ARGS ?=

.PHONY: setup setup-dev demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[local]"
	touch $@

# The dev extra includes sparkmagic, whose Kerberos dependency builds from source:
# Debian/Ubuntu need `apt-get install libkrb5-dev` first.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	@command -v krb5-config >/dev/null || { echo "error: sparkmagic needs Kerberos headers: apt-get install libkrb5-dev"; exit 1; }
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.local

setup: $(VENV)/.local

setup-dev: $(VENV)/.dev

demo: setup
	$(BIN)/python -m imagepca sample $(SAMPLE)
	$(BIN)/python -m imagepca run --input $(SAMPLE) --output $(OUTPUT) --weights $(WEIGHTS)

test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check lib tests benchmarks
	$(BIN)/ruff format --check lib tests benchmarks

format: setup-dev
	$(BIN)/ruff format lib tests benchmarks
	$(BIN)/ruff check --fix lib tests benchmarks

bench: setup-dev
	$(BIN)/python benchmarks/featurize.py

clean:
	rm -rf $(OUTPUT) $(SAMPLE) .pytest_cache .ruff_cache build dist
