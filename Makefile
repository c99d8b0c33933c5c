# Two commands for a new machine: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install recops into it; nothing needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
# The one set of versions: every package recops and its extras need, pinned for Linux x86_64 and Python 3.11.
# CI (make install, hence make demo and make test) and the three images install with it as a pip constraints
# file, each only the extras it needs; tests/test_lock.py checks it against pyproject.toml and this venv.
LOCK := requirements.lock
UV_VERSION := 0.13.9

.PHONY: install lock system-deps cuda-toolchain kernels kafka demo test lint images images-local clean

$(BIN)/recops: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) -e '.[train,serve,operator,dev]'
	touch $@

install: $(BIN)/recops

## Regenerates requirements.lock from pyproject.toml (all extras) with uv: run it after changing a
## dependency. Versions already pinned stay where they still fit; UPGRADE=1 moves every package to its newest.
lock: | $(BIN)/recops
	@$(BIN)/uv --version 2>/dev/null | grep -qx 'uv $(UV_VERSION).*' || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	  --annotation-style line --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) --output-file $(LOCK)

# Real Prometheus (gate tests), wrk (serving benchmark) and openssl (the local control plane's keys) come
# from Debian; so do what the real node (e2e_tests/realnode.py) and the local image build need: buildah,
# mmdebstrap, runc, socat, iptables and conntrack (kube-proxy). Installed when missing.
SYSTEM_TOOLS := prometheus wrk openssl buildah mmdebstrap runc socat iptables conntrack
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing from Debian"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing:$$missing; install them (e.g. sudo apt-get install$$missing)"; exit 1; fi; \
	fi

# A real Apache Kafka broker (KRaft) for the router's Kafka feedback tests: Maven (Debian's, installed when
# missing) copies the broker jars that tests/kafka/pom.xml names into ~/.cache/recops; a no-op once cached.
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tests/kafka/pom.xml)
KAFKA_HOME ?= $(HOME)/.cache/recops/kafka-$(KAFKA_VERSION)
$(KAFKA_HOME)/.complete: tests/kafka/pom.xml
	@for tool in mvn java; do command -v $$tool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing maven from Debian"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends maven >/dev/null; \
	  else echo "make kafka needs $$tool (e.g. sudo apt-get install maven)"; exit 1; fi; }; done
	rm -rf $(KAFKA_HOME)/libs.tmp
	mvn -q -B -f tests/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
	  -DoutputDirectory=$(KAFKA_HOME)/libs.tmp
	rm -rf $(KAFKA_HOME)/libs && mv $(KAFKA_HOME)/libs.tmp $(KAFKA_HOME)/libs
	touch $@

kafka: $(KAFKA_HOME)/.complete

# nvcc from PyPI at the CUDA version of torch's runtime wheel: compiles the CUDA kernels without a GPU.
$(VENV)/.cuda-toolchain: $(BIN)/recops
	$(BIN)/python -m pip install --quiet $$($(BIN)/python -m recops.kernels.toolchain) ninja
	touch $@

cuda-toolchain: $(VENV)/.cuda-toolchain

## The CUDA kernels (kernels/), compiled for sm_80, sm_90 and PTX and installed into the venv; recops uses
## them on a GPU (without this, a GPU machine compiles them on first use, and CPUs use the torch reference).
kernels: cuda-toolchain
	$(BIN)/python kernels/build.py --out kernels/build/lib
	CUDA_HOME=$$($(BIN)/python -c "from recops.kernels.toolchain import cuda_home; print(cuda_home())") \
	  $(BIN)/python -m pip install --quiet --no-build-isolation ./kernels

## The whole loop on this machine: train a control and the LLM two-tower on the synthetic shop log, serve both
## with Triton behind the A/B router, ramp the treatment with simulated shoppers and real gates, promote or
## roll back, write runs/demo/report.html and summary.json.
demo: install
	$(BIN)/recops demo --out $(OUT)

## Lint, then every test: unit and component tests (tests/; the CUDA kernels are compiled, and their device
## code run on the CPU through an emulation), then the operator on a local Kubernetes
## control plane (e2e_tests/; its binaries are built from Go modules on first use and cached).
test: install system-deps cuda-toolchain kafka
	$(BIN)/ruff check src tests e2e_tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests e2e_tests benchmarks
	$(BIN)/hadolint $(DOCKERFILES)

## The three images, built and pushed with docker buildx (log in to $(REGISTRY) first). Their names are
## the operator's default images (src/recops/operator/settings.py): $(REGISTRY)/{operator,trainer,triton}:$(VERSION).
## The context is the repository root; .dockerignore keeps it to the package sources.
REGISTRY ?= ghcr.io/recops
VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/recops/__init__.py)
PLATFORMS ?= linux/amd64
# image name : folder of its Dockerfile
IMAGES := operator:operator trainer:trainer_image triton:triton_image
DOCKERFILES := $(foreach image,$(IMAGES),$(word 2,$(subst :, ,$(image)))/Dockerfile)

images:
	@docker buildx version >/dev/null 2>&1 || { \
	  echo "make images needs docker buildx (Docker Desktop, or the docker-buildx plugin with Docker Engine):"; \
	  echo "  https://docs.docker.com/build/install-buildx/"; exit 1; }
	@test -n "$(VERSION)" || { echo "no __version__ in src/recops/__init__.py: set VERSION=..."; exit 1; }
	@set -e; for image in $(IMAGES); do \
	  name=$${image%%:*}; folder=$${image#*:}; \
	  echo "building $(REGISTRY)/$$name:$(VERSION) from $$folder/Dockerfile"; \
	  docker buildx build --platform $(PLATFORMS) --build-arg VERSION=$(VERSION) \
	    --tag $(REGISTRY)/$$name:$(VERSION) --file $$folder/Dockerfile --push . ; \
	done

## The three images built on this machine, no Docker engine or registry: a Debian base (mmdebstrap) and
## buildah, root only; OCI archives in ~/.cache/recops/images (see images/build-local.sh).
## IMAGES_LOCAL=operator builds only that one.
IMAGES_LOCAL ?= operator trainer triton
images-local:
	images/build-local.sh $(IMAGES_LOCAL)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache kernels/build
