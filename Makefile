# The README's commands. Every install step lives here and in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5000

.PHONY: repro test ui bench compare register reproduce sweep search preset lint clean-venv

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

# Two worker processes (the 2 cores CI has); the tests that share an expensive fixture (a
# reproduced repository, a tracking server, DDP trainings) stay in one worker each (loadgroup).
# One file or test without them: .venv/bin/python -m pytest tests/test_model.py (docs/testing.md).
# One torch thread per worker unless OMP_NUM_THREADS is set: two workers that each take every
# core (torch's default) oversubscribe 2 cores, and a training step then ran 6 times slower
# (docs/testing.md). Tests that train with several processes share the cores out themselves.
TEST_WORKERS ?= 2
TEST_THREADS ?= $(or $(OMP_NUM_THREADS),1)
test: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=$(TEST_THREADS) \
		$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

ui: $(VENV)/.installed
	$(BIN)/python -m vaelab.tracking.ui --port $(PORT) \
		--experiment "$$($(BIN)/python -c 'from vaelab.params import load; print(load("params.yaml").mlflow.experiment)')"

# The tutorial's training loop vs vaelab's on real MNIST (prepared by DVC first). Add arguments
# with BENCH_ARGS, e.g. make bench BENCH_ARGS="--epochs 5 --compile".
BENCH_ARGS ?=
bench: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro prepare
	$(BIN)/python -m vaelab.bench --data-dir data/MNIST --report reports/benchmark.md $(BENCH_ARGS)

# Compare finished runs from MLflow: reports/comparison.md + .csv, figures in reports/comparison/,
# also logged to a "comparison" run. E.g. make compare COMPARE_ARGS="--filter \"tags.sweep = 'x'\""
COMPARE_ARGS ?=
compare: $(VENV)/.installed
	$(BIN)/python -m vaelab.compare --params params.yaml --report reports/comparison.md \
		--figures reports/comparison $(COMPARE_ARGS)

# Register the model of the best finished run (lowest eval/val_iw/nll, docs/choosing.md) as a
# new version of "vaelab-vae" and point the alias "champion" at it: models:/vaelab-vae@champion.
# E.g. make register REGISTER_ARGS="--filter \"tags.sweep = 'x'\"", or a search's confirmed
# winner: make register REGISTER_ARGS="--search NAME"
REGISTER_ARGS ?=
register: $(VENV)/.installed
	$(BIN)/python -m vaelab.register --params params.yaml $(REGISTER_ARGS)

# Re-create a run from its id (or name) in a temporary clone and say whether it came out
# identical: make reproduce RUN=<run id or name> [REPRODUCE_ARGS="--threads 2"]. The command's
# exit status: 0 identical, 3 differs, 2 an error (make reports each as its own failure).
RUN ?=
REPRODUCE_ARGS ?=
reproduce: $(VENV)/.installed
	@test -n '$(RUN)' || { echo "usage: make reproduce RUN=<run id or name>" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m vaelab.reproduce --params params.yaml \
		'$(RUN)' $(REPRODUCE_ARGS)

# A sweep: a grid of params values queued as DVC experiments (one per combination), run
# SWEEP_JOBS at a time as children of one MLflow parent run, then compared (docs/comparing.md).
# The default: latent_dims 2, 5, 10, 20. A grid: make sweep SWEEP="model.latent_dims=5,10
# train.seed=0,1,2". One key: SWEEP_KEY / SWEEP_VALUES. SWEEP_NAME: the runs' sweep tag.
SWEEP_KEY    ?= model.latent_dims
SWEEP_VALUES ?= 2,5,10,20
SWEEP        ?= $(SWEEP_KEY)=$(SWEEP_VALUES)
SWEEP_JOBS   ?= 2
SWEEP_MAX    ?= 64
SWEEP_NAME   ?=
sweep: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m vaelab.sweep --params params.yaml \
		--report reports/comparison.md --figures reports/comparison --grid '$(SWEEP)' \
		--jobs $(SWEEP_JOBS) --max $(SWEEP_MAX) $(if $(SWEEP_NAME),--label '$(SWEEP_NAME)')

# A search (docs/search.md): an Optuna study over params.yaml keys, each trial a DVC experiment
# and a child run of one MLflow parent, pruned on validation, its best confirmed over seeds.
# make search SEARCH=searches/NAME.yaml [STORAGE=postgresql://... or a journal file] [SEARCH_JOBS=2]
# Run it again to continue the study; another clone with the same STORAGE and
# MLFLOW_TRACKING_URI joins it.
SEARCH      ?= searches/latent-hidden-lr.yaml
STORAGE     ?=
SEARCH_JOBS ?=
search: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m vaelab.search --search '$(SEARCH)' \
		--params params.yaml --pipeline dvc.yaml --state .search --report reports/search.md \
		--figures reports/search $(if $(STORAGE),--storage '$(STORAGE)') \
		$(if $(SEARCH_JOBS),--jobs $(SEARCH_JOBS))

# Run a preset (presets/*.yaml) as a DVC experiment: make preset PRESET=bernoulli-2d, with
# overrides: make preset PRESET=burda-iwae PRESET_ARGS="-S loss.samples=50"
PRESET ?= tutorial
PRESET_ARGS ?=
preset: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m vaelab.presets --dir presets \
		--params params.yaml $(PRESET) $(PRESET_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean-venv:
	rm -rf $(VENV)
