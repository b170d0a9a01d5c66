# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first:
# torch 2.13.0 (the CPU build) before anything else, so no dependency pulls a CUDA torch;
# then the exact versions in requirements.lock, so every machine runs the same packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimline-installed
LOCK := requirements.lock

# torch stays out of the lock and is pinned here: pip takes this release's CPU wheel from the
# machine's find-links folder (pip.conf), while PyPI's wheel of it is the CUDA build, whose
# metadata pulls nvidia-*, cuda-* and triton.
TORCH := torch==2.13.0
TORCH_WHEELS ?= /opt/wheels

# Extra pytest arguments, e.g. `make test PYTEST_ARGS=tests/core/test_recipe.py`.
PYTEST_ARGS ?=

.PHONY: setup demo test lint lock test-latest bench clean

# torch's own dependencies (sympy, networkx, ...) are in the lock, so `-c` holds them at its
# versions from the first install. The lock holds every dependency, so slimline goes in with
# --no-deps; `pip check` then fails if pyproject.toml changed and the lock was not regenerated.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -c $(LOCK)
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/slimline demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Regenerates requirements.lock from pyproject.toml's `dev` extra with a pinned uv in a venv of
# its own. It resolves against the same CPU torch the venv gets (the wheel in TORCH_WHEELS), for
# CPython 3.11 on x86_64 Linux (the machines this project runs on), then leaves torch out.
# Pins already in the lock are kept where they still fit; `make lock LOCK_ARGS=--upgrade` moves
# everything to the newest versions the ranges allow.
LOCK_VENV := .venv-lock
UV := uv==0.13.9
LOCK_ARGS ?=

COMPILE = uv pip compile pyproject.toml - --extra dev --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) --no-emit-package torch

# The lock's header names both `make lock` and the exact command it runs. The check after it
# allows nvidia-ml-py: codecarbon's pure-Python NVML bindings, no CUDA library.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(UV)
	echo "$(TORCH)" | $(LOCK_VENV)/bin/$(COMPILE) --quiet $(LOCK_ARGS) -o $(LOCK) \
	  --custom-compile-command "make lock, which runs ($(UV)): echo $(TORCH) | $(COMPILE)"
	@if grep -E '^(triton|cuda-|nvidia-)' $(LOCK) | grep -v '^nvidia-ml-py=='; then \
	  echo "$(LOCK) holds CUDA packages: the CPU torch wheel is not in $(TORCH_WHEELS)"; exit 1; fi

# The same checks on the newest versions pyproject.toml's ranges allow, in a venv of its own,
# to see a coming break before the lock moves. torch stays pinned: an upgrade could otherwise
# swap in PyPI's CUDA build of a later release.
LATEST := .venv-latest

test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet $(TORCH)
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"
	$(LATEST)/bin/pip check
	$(LATEST)/bin/ruff check src tests benchmarks
	$(LATEST)/bin/mypy
	$(LATEST)/bin/pytest $(PYTEST_ARGS)

BENCHES := minilm_cpu weight_quant pruning structured swiftprune_timing kv_cache

bench: setup
	$(BIN)/pip install --quiet -e ".[peers]"
	for b in $(BENCHES); do $(BIN)/python -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) $(LATEST) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
