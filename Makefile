# Two commands for a new machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install recops into it; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install system-deps demo test lint clean

$(BIN)/recops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,serve,operator,dev]'
	touch $@

install: $(BIN)/recops

# Real Prometheus (gate tests), wrk (serving benchmark) and openssl (the local control plane's keys) come
# from Debian; installed when missing.
SYSTEM_TOOLS := prometheus wrk openssl
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing from Debian"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing:$$missing; install them (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi

## The whole loop on this machine: train a control and the LLM two-tower on the synthetic shop log, serve both
## with Triton behind the A/B router, ramp the treatment with simulated shoppers and real gates, promote or
## roll back, write runs/demo/report.html and summary.json.
demo: install
	$(BIN)/recops demo --out $(OUT)

## Lint, then every test: unit and component tests (tests/), then the operator on a local Kubernetes
## control plane (e2e_tests/; its binaries are built from Go modules on first use and cached).
test: install system-deps
	$(BIN)/ruff check src tests e2e_tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests e2e_tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
