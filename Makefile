# Two commands are the whole setup on a fresh machine with only python3:
#   make run    create .venv if missing or stale, make the synthetic cohort, run every notebook, print the report path
#   make test   same environment, run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=
# test files spread over two pytest-xdist workers, the end-to-end files first (tests/conftest.py; those runs use
# about one core most of the time); each worker is pinned to its share of the cores (tests/conftest.py)
# PYTEST_WORKERS=0 runs them in one process
PYTEST_WORKERS ?= 2

.PHONY: run test smoke bench lab clean-venv

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[lab,test]"
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nrfm run --config $(CONFIG)

smoke: $(STAMP)
	$(VENV)/bin/nrfm run --config configs/smoke.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/nrfm bench

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
