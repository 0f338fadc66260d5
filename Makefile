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

test: venv
	$(PY) -m pytest -q tests $(ARGS)

bench-cpu: venv
	$(PY) bench/scheduler.py

clean:
	rm -rf runs outputs .pytest_cache
