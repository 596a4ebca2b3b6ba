# The README's two commands: `make tables` and `make test`. Both create .venv from requirements.txt
# (pinned versions, Jupyter included), add requirements-nodeps.txt without dependencies (packages
# wanted only for data files they ship), and install this project into it in editable mode, when .venv
# is missing or one of those files or pyproject.toml changed; otherwise they reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-requirements
TABLES := $(sort $(basename $(notdir $(filter-out %/__init__.py,$(wildcard experiments/tables/*.py)))))
PYTEST_WORKERS ?= 3

.PHONY: tables test test-quick test-flake venv $(addprefix table-,$(TABLES))

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Every table script at the cpu preset; each writes results/<paper>.md and its plots.
tables: $(STAMP)
	@if [ -z "$(TABLES)" ]; then echo "no table scripts in experiments/tables yet"; fi
	@set -e; for t in $(TABLES); do echo "== table $$t"; $(PY) -m experiments.tables.$$t --preset cpu; done

table-%: $(STAMP)
	$(PY) -m experiments.tables.$* --preset cpu

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

# The quick tier for iteration: everything but the end-to-end tests marked slow.
test-quick: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" --durations=10 tests

# The flake check to run before resolving an issue: every randomized test of the quick tier under
# FLAKE_SEEDS suite seeds (FLAKE_SEED, FLAKE_SEED + 1, ...); a failure prints its replay command.
FLAKE_SEEDS ?= 100
FLAKE_SEED ?= $(shell date +%s)
test-flake: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q -m "randomized and not slow" --seeds $(FLAKE_SEEDS) \
	  --seed $(FLAKE_SEED) -p no:cacheprovider tests
