# tff_sam: every target installs what it needs first (idempotent; see BUILD_NOTES.md).
#   make demo      federated fine-tuning on the embedded default data -> runs/demo/
#   make test      the whole test suite (what .ci/run calls)
#   make test-fast the suite without tests marked slow (for iterating; CI runs them all)
#   make install   only create/update .venv/ (and `make install-torch` .venv-torch/, the
#                  PyTorch-only environment the export tests load PyTorch exports in)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
TFF_VERSION := 0.87.0
# Installed with --no-deps after the lock: its protobuf~=3.20 pin conflicts with TF 2.14's
# protobuf 4.25.3, with which it works (BUILD_NOTES.md).
TF2ONNX_VERSION := 1.16.1
TORCH_VENV := .venv-torch
TORCH_HASH := $(shell { cat requirements-torch.lock; } 2>/dev/null | sha256sum | cut -c1-16)
TORCH_STAMP := $(TORCH_VENV)/.tff_sam-torch-env-$(TORCH_HASH)
# The stamp's name is a hash of everything that decides the environment: a second run
# with unchanged pins finds it and installs nothing; a changed pin makes a new stamp.
ENV_HASH := $(shell { cat requirements.lock setup.cfg pyproject.toml; echo "gpu=$(GPU) tf2onnx=$(TF2ONNX_VERSION)"; test -z "$(GPU)" || cat requirements-gpu.lock; } 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.tff_sam-env-$(ENV_HASH)
PYTEST_ARGS ?=
# Tests run in this many processes (pytest-xdist), each file's tests in one of them
# (module fixtures are built once); 2 = the CI machine's cores. PYTEST_WORKERS=0: one.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)
# GPU=1 also installs TF 2.14.1's CUDA 11.8 runtime wheels, pinned with hashes in
# requirements-gpu.lock (about 3 GB; see BUILD_NOTES.md, "GPU").
GPU ?=

.PHONY: install install-torch demo test test-fast bench clean-env

install: $(STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found. tensorflow-federated 0.87 needs Python 3.9-3.11; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { echo "error: $(PYTHON) is not Python 3.11 (tensorflow-federated 0.87 supports 3.9-3.11; this project pins 3.11)." >&2; exit 1; }
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps tensorflow-federated==$(TFF_VERSION)
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps tf2onnx==$(TF2ONNX_VERSION)
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@if [ -n "$(GPU)" ]; then $(VPY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-gpu.lock; fi
	@rm -f $(VENV)/.tff_sam-env-*
	@touch $(STAMP)
	@echo "environment ready: $(VENV) ($(ENV_HASH))"

install-torch: $(TORCH_STAMP)

$(TORCH_STAMP):
	@test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-torch.lock
	@rm -f $(TORCH_VENV)/.tff_sam-torch-env-*
	@touch $(TORCH_STAMP)
	@echo "PyTorch environment ready: $(TORCH_VENV) ($(TORCH_HASH))"

# The demo, then its numbers next to the committed comparison's (README's tables).
DEMO_COMPARE := docs/demo_compare.json
demo: install
	$(VPY) -m tff_sam.experiments.run --flagfile=experiments/demo.flags
	@if [ -f $(DEMO_COMPARE) ]; then $(VPY) tools/demo_check.py runs/demo $(DEMO_COMPARE); fi

test: install install-torch
	TFF_SAM_TORCH_PYTHON=$(CURDIR)/$(TORCH_VENV)/bin/python $(VPY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: install install-torch
	TFF_SAM_TORCH_PYTHON=$(CURDIR)/$(TORCH_VENV)/bin/python $(VPY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV) $(TORCH_VENV)

bench: install
	$(VPY) -m tff_sam.experiments.bench --output_dir runs/bench
