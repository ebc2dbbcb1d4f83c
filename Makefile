# Targets people already know: setup, test, lint, demo, lab (plus bench and clean).
# Everything runs in .venv, created on first use with Python 3.11. The Debian packages a
# target needs are installed first (as root, with apt-get), or the target stops before any
# work and prints the one command to run.

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
LAB_PORT ?= 8888

# Debian packages, each as PACKAGE:PROBE; the package counts as present when its probe (a
# command on PATH, or an absolute path) exists.
#   Java: Spark. Kerberos headers: sparkmagic's gssapi builds from source (dev extra).
#   shellcheck: lints the EMR bootstrap scripts. Chromium: the JupyterLab browser test.
#   git: a test lists the repository's files. A CJK font: figures with Chinese labels.
JAVA_DEPS := openjdk-17-jre-headless:java
TEST_DEPS := $(JAVA_DEPS) libkrb5-dev:krb5-config shellcheck:shellcheck chromium:/usr/bin/chromium \
	git:git fonts-wqy-microhei:/usr/share/fonts/truetype/wqy/wqy-microhei.ttc

# $(call debian_packages,PACKAGE:PROBE ...): install the missing ones (apt-get update once),
# or stop with the command to run when this user cannot.
define debian_packages
	@missing=""; \
	for dep in $(1); do \
	    package=$${dep%%:*}; probe=$${dep#*:}; \
	    case "$$probe" in /*) test -e "$$probe" ;; *) command -v "$$probe" >/dev/null ;; esac \
	        || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	        sudo=$$(test "$$(id -u)" = 0 || echo "sudo "); \
	        echo "error: missing system packages:$$missing. Install them first (Debian/Ubuntu):"; \
	        echo "    $${sudo}apt-get update && $${sudo}apt-get install -y --no-install-recommends$$missing"; \
	        exit 1; \
	    fi; \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	        || { echo "error: apt-get install$$missing failed"; exit 1; }; \
	fi
endef

.PHONY: setup setup-dev system-deps system-deps-test demo test lint format lab bench bench-scale clean

system-deps:
	$(call debian_packages,$(JAVA_DEPS))

system-deps-test:
	$(call debian_packages,$(TEST_DEPS))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.local: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[local]"
	touch $@

# The dev extra holds the local one (JupyterLab included) plus the test tools.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.local

# The system check runs first: a missing package stops the target before the venv is made.
setup: system-deps
	@$(MAKE) --no-print-directory $(VENV)/.local

setup-dev: system-deps-test
	@$(MAKE) --no-print-directory $(VENV)/.dev

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

# JupyterLab on this machine only (127.0.0.1), opening notebooks/ (LAB_NOTEBOOKS), on the
# project's venv. Kernels start in the project's root, as `imagepca run` and papermill do, so
# the notebooks' default paths (data/sample, output/sample) work. Jupyter prints the URL to
# open, with its token; LAB_ARGS adds server options (e.g. --IdentityProvider.token=...).
# Jupyter refuses root unless told (--allow-root): machines like CI's run as root.
LAB_NOTEBOOKS ?= notebooks
LAB_ARGS ?=
lab: setup
	@echo "JupyterLab on http://127.0.0.1:$(LAB_PORT)/lab (notebooks: $(LAB_NOTEBOOKS)); Ctrl+C twice stops it"
	$(BIN)/jupyter-lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) --port-retries=0 \
	    --ServerApp.root_dir=$(LAB_NOTEBOOKS) --MappingKernelManager.root_dir=$(CURDIR) \
	    $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: setup-dev
	$(BIN)/python benchmarks/featurize.py

# How a whole run's cost grows with n (about 40 minutes): docs/performance.md, docs/scale.png.
bench-scale: setup-dev
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf $(OUTPUT) $(SAMPLE) .pytest_cache .ruff_cache build dist test-artifacts
