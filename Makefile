# Set-up is part of every target: the first call creates .venv and installs the pinned
# dependencies (requirements/constraints.txt) and the package; later calls reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast lint clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## make train ARGS="train.max_steps=500 model=llama_125m"  -- the default pretraining run
train: $(STAMP)
	$(PY) -m harness.train $(ARGS)

## make test  -- the whole suite (slow end-to-end tests included), as CI runs it
test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check harness tests
	$(VENV)/bin/ruff format --check harness tests

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
