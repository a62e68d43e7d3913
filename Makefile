# Persona: `make demo` runs the pipeline on the bundled sample, `make test` runs the tests.
# Both create .venv first when it is missing (or when pyproject.toml changed).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast bench clean-data help

help:
	@echo "make demo   - dvc repro on the bundled sample (creates .venv if missing)"
	@echo "make test   - run the test suite (creates .venv if missing)"
	@echo "make bench  - run the benchmarks, results in benchmarks/results/"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	@test -d .git || git init -q
	$(VENV)/bin/dvc repro

# Two test processes, one per core on CI: a serial run leaves about half the CPU idle (it waits on
# Ray, servers and subprocesses). Files stay whole on one worker (--dist loadfile; loadgroup's
# xdist_group marks have no effect with pytest 9.2 + xdist 3.8), longest first (tests/conftest.py).
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: venv
	$(PY) -m benchmarks.run_all

clean-data:
	rm -rf data/ingest data/dedup data/align data/masks data/caption data/wplus data/identity data/shards data/runs metrics
