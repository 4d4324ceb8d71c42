# `make demo` and `make test` each work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[plot]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,plot]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/merf-dask demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet merf gpboost statsmodels
	$(BIN)/python bench/run.py
