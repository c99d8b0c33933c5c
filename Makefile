# Two commands for a new machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install recops into it; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test lint clean

$(BIN)/recops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,serve,dev]'
	touch $@

install: $(BIN)/recops

## Train the two-tower model on the synthetic shop log, evaluate it beside the baselines, write the report.
demo: install
	$(BIN)/recops train -f examples/recmodel-synthetic.yaml --out $(OUT)

## Lint, then every test (unit, then the training end-to-end tests).
test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
