# The two set-up commands of the README:
#   make run    install into .venv and start cmsod on the embedded defaults, state under ./var
#   make test   install into .venv (with the test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

run: $(VENV)/.installed
	$(BIN)/cmsod --state-dir var

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check cmsod tests bench man
	$(BIN)/ruff format --check cmsod tests bench man
	$(BIN)/mypy

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/submit.py
	$(BIN)/python bench/optimizer.py
	$(BIN)/python bench/crash.py
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/http.py
	$(BIN)/python bench/http_floor.py

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "cmsod needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=77'  # pyproject's SPDX license string

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
