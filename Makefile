# Two commands do all the set-up: `make serve` and `make test`. Each installs what is missing first.
# The first Python 3.11-3.13 on PATH (3.11 is what the suite runs on); `make PYTHON=/path/to/python3.x` picks one.
SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,\
	$(shell command -v $(p) >/dev/null 2>&1 && $(p) -c '$(SUPPORTED)' 2>/dev/null && echo $(p))))
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact versions the project is tested with; the ranges a library needs are in pyproject.toml.
# `make CONSTRAINTS=` installs from the ranges alone (a machine whose torch should stay as it is).
CONSTRAINTS ?= constraints.txt
# The stamp names a hash of pyproject.toml and the constraints: editing either re-installs, nothing else does.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: install test test-long test-fast serve bench load lint constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || test -n "$(PYTHON)" || { echo "make: no Python 3.11, 3.12 or 3.13 on PATH. Install one \
	(Debian/Ubuntu: apt install python3 python3-venv) or name it: make PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,mobile,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest

# The head-node failure tests: two multi-node clusters, about five minutes.
test-long: install
	$(PY) -m pytest -m long

test-fast: install
	$(PY) -m pytest -m "not slow and not cluster and not chromium and not long"

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

# Rewrites constraints.txt from what the virtual environment has now (after a deliberate upgrade, tested).
constraints: install
	$(PY) -m pip freeze --exclude-editable | sed '1i # Exact versions the suite runs with: make installs from this file. Rewrite with `make constraints`.' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
