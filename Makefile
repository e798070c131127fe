# The project's two commands: `make run` (set up and start everything) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv browser lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(PY) -m backend.cli run

# Debian's chromium drives the end-to-end tests; installed once when missing.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: venv
	$(PY) -m ruff check app backend frontend sample_models tests benchmarks

test: venv browser lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow"
