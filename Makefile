# Two commands do all the set-up: `make serve` and `make test`. Each installs what is missing first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp names a hash of pyproject.toml: editing dependencies re-installs, anything else does nothing.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: install test test-fast serve bench load lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,load,mobile,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not cluster and not chromium"

serve: install
	$(PY) -m serve_app.run

bench: install
	$(PY) -m load.bench

USERS ?= 64
SECONDS ?= 60
HOST ?= http://127.0.0.1:8000
load: install
	$(VENV)/bin/locust -f load/locustfile.py --headless --users $(USERS) --spawn-rate $(USERS) \
		--run-time $(SECONDS)s --host $(HOST) --only-summary

lint: install
	$(PY) -m ruff check .
	$(PY) -m pip_audit --strict --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
