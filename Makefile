# `make run` starts the service; `make test` runs every test. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint install bench emulator clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# make passes a SIGTERM on to serve.py, which stops gunicorn and the emulator; killed
# outright, make takes serve.py with it (PR_SET_PDEATHSIG), which does the same.
run: install
	$(PY) serve.py

lint: install
	$(VENV)/bin/ruff check .

test: lint
	bash scripts/system-deps.sh
	$(PY) -m pytest

emulator: install
	$(PY) -m replicate_emulator --port 5099

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

bench: install
	$(PY) -m bench
