# The README's two commands: `make tables` and `make test`. Both create .venv from requirements.txt
# when it is missing (or requirements.txt changed) and reuse it otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-requirements
TABLES := $(sort $(basename $(notdir $(filter-out %/__init__.py,$(wildcard experiments/tables/*.py)))))
PYTEST_WORKERS ?= 2

.PHONY: tables test venv $(addprefix table-,$(TABLES))

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Every table script at the cpu preset; each writes results/<paper>.md and its plots.
tables: $(STAMP)
	@if [ -z "$(TABLES)" ]; then echo "no table scripts in experiments/tables yet"; fi
	@set -e; for t in $(TABLES); do echo "== table $$t"; $(PY) -m experiments.tables.$$t --preset cpu; done

table-%: $(STAMP)
	$(PY) -m experiments.tables.$* --preset cpu

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests
