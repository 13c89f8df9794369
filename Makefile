# tff_sam: every target installs what it needs first (idempotent; see BUILD_NOTES.md).
#   make demo      federated fine-tuning on the embedded default data -> runs/demo/
#   make test      the whole test suite (what .ci/run calls)
#   make test-fast the suite without tests marked slow (for iterating; CI runs them all)
#   make install   only create/update .venv/
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
TFF_VERSION := 0.87.0
# The stamp's name is a hash of everything that decides the environment: a second run
# with unchanged pins finds it and installs nothing; a changed pin makes a new stamp.
ENV_HASH := $(shell { cat requirements.lock setup.cfg pyproject.toml; echo "gpu=$(GPU)"; } 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.tff_sam-env-$(ENV_HASH)
PYTEST_ARGS ?=
# GPU=1 also installs TF's CUDA runtime wheels (several GB; see BUILD_NOTES.md).
GPU ?=

.PHONY: install demo test test-fast bench clean-env

install: $(STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found. tensorflow-federated 0.87 needs Python 3.9-3.11; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { echo "error: $(PYTHON) is not Python 3.11 (tensorflow-federated 0.87 supports 3.9-3.11; this project pins 3.11)." >&2; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps tensorflow-federated==$(TFF_VERSION)
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@if [ -n "$(GPU)" ]; then $(VPY) -m pip install --quiet --disable-pip-version-check "tensorflow[and-cuda]==2.14.1" -c requirements.lock; fi
	@rm -f $(VENV)/.tff_sam-env-*
	@touch $(STAMP)
	@echo "environment ready: $(VENV) ($(ENV_HASH))"

demo: install
	$(VPY) -m tff_sam.experiments.run --flagfile=experiments/demo.flags

test: install
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)

bench: install
	$(VPY) -m tff_sam.experiments.bench --output_dir runs/bench
