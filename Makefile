# Two commands on a fresh machine: `make train` and `make test`. Both bootstrap .venv when missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
ARGS    ?=

.PHONY: venv train test bench-cpu clean

$(VENV)/.ok: pyproject.toml
	bash scripts/bootstrap.sh $(VENV)
	touch $@

venv: $(VENV)/.ok

train: venv
	$(PY) -m seqmesh train $(ARGS)

# Layers first (pyproject.toml [tool.importlinter]): an upward import fails in seconds, before the suite.
test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests $(ARGS)

bench-cpu: venv
	$(PY) bench/scheduler.py
	$(PY) bench/scheduler_sim.py

clean:
	rm -rf runs outputs .pytest_cache .import_linter_cache
