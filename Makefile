# `make demo` and `make test` each work on a fresh clone: they create .venv when it is missing.
#
# Installs go through uv (pip-installed into .venv from PyPI, so a bare python3 is enough) and
# fall back to plain pip when uv cannot be installed; `make test INSTALLER=pip` forces pip.
# Both read constraints.txt (pinned versions of every dependency of the test, plot and progress
# extras), so neither resolver backtracks. `make constraints` regenerates it after a change to
# the dependencies in pyproject.toml.
PYTHON ?= python3
INSTALLER ?= uv
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
COMPILE_EXTRAS := --extra test --extra plot --extra progress
COMPILE_FLAGS ?=
DEMO_REQUIREMENTS := -e ".[plot,progress]"
TEST_REQUIREMENTS := -e ".[test,plot,progress]"
BENCH_REQUIREMENTS := merf gpboost statsmodels

.PHONY: demo test bench constraints clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# $(call install,REQUIREMENTS): uv when it can be installed and INSTALLER is not pip, else pip.
# REQUIREMENTS is passed as a variable, because call splits its arguments at commas.
define install
	@if [ "$(INSTALLER)" != pip ] && { [ -x $(BIN)/uv ] || $(BIN)/python -m pip install --quiet uv; }; then \
	  echo 'uv pip install $(1)'; \
	  $(BIN)/uv pip install --python $(BIN)/python --constraint $(CONSTRAINTS) $(1); \
	else \
	  echo 'pip install $(1) (uv not used)'; \
	  $(BIN)/python -m pip install --quiet --upgrade pip || true; \
	  $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) $(1); \
	fi
endef

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(call install,$(DEMO_REQUIREMENTS))
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(call install,$(TEST_REQUIREMENTS))
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/merf-dask demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.installed-test
	$(call install,$(BENCH_REQUIREMENTS))
	$(BIN)/python bench/run.py

# Regenerate the pins (uv resolves in seconds) and commit constraints.txt with the pyproject
# change. Existing pins are kept where they still fit; COMPILE_FLAGS=--upgrade moves all to the
# newest releases.
constraints: | $(BIN)/python
	[ -x $(BIN)/uv ] || $(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml $(COMPILE_EXTRAS) --universal $(COMPILE_FLAGS) \
	  --custom-compile-command "make constraints" -o $(CONSTRAINTS)

clean:
	rm -rf $(VENV) build *.egg-info
