# The README's commands. Every install step lives here and in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5000

.PHONY: repro test ui bench lint clean-venv

# The venv is rebuilt when pyproject.toml changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

repro: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

ui: $(VENV)/.installed
	$(BIN)/python -m vaelab.tracking --port $(PORT)

# The tutorial's training loop vs vaelab's on real MNIST (prepared by DVC first). Add arguments
# with BENCH_ARGS, e.g. make bench BENCH_ARGS="--epochs 5 --compile".
BENCH_ARGS ?=
bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro prepare
	$(BIN)/python -m vaelab.bench --data-dir data/MNIST --report reports/benchmark.md $(BENCH_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-venv:
	rm -rf $(VENV)
