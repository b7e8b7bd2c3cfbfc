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

# The demo: what this machine can run, a short pretraining run on the embedded corpus (its loss falls), a short
# chat fine-tune from that checkpoint (loss on assistant tokens only), then the fine-tuned model answers questions.
# Each invocation trains fresh runs named demo-<time>, so earlier runs are never touched.
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)
demo: install
	$(BIN)/ghostvis doctor
	$(BIN)/ghostvis train base_train --run $(DEMO_RUN)-base
	$(BIN)/ghostvis train chat_sft --run $(DEMO_RUN)-chat --num-steps 150 init_from=$(DEMO_RUN)-base
	$(BIN)/ghostvis infer --run $(DEMO_RUN)-chat --prompt "Which is bigger, 7 or 4?"
	$(BIN)/ghostvis infer --run $(DEMO_RUN)-chat --prompt "What is 6 plus 12?"

# pytest exits 5 when it collects no tests; make treats that as a failure, as it should.
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install 'ruff>=0.6'
	$(BIN)/python -m ruff check .

bench: install
	$(BIN)/ghostvis bench kernels
