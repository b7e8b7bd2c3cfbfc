# GhostVis developer commands; the README names these. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_PIP_ARGS ?=
# Re-run the install only when the package metadata changes.
STAMP := $(VENV)/.ghostvis-installed

.PHONY: install demo test lint bench

install: $(STAMP)

# torch is pinned and installed only when missing: an unpinned torch pulls a multi-GB CUDA build, and an
# existing CUDA build must be kept as it is.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: install
	$(BIN)/ghostvis doctor
# DEMO-TRAIN: the tiny training run is added to this target below this line.

# pytest exits 5 when it collects no tests; make treats that as a failure, as it should.
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install 'ruff>=0.6'
	$(BIN)/python -m ruff check .

bench: install
	$(BIN)/ghostvis bench kernels
