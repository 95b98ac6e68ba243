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

.PHONY: install web-runtime test test-long test-fast serve status classify bench load lint constraints clean

install: $(STAMP) web-runtime

# The offline page's runtime (docs/offline.md): ONNX Runtime Web from the npm registry at a pinned version, checked
# against the tarball's hash, unpacked into a folder the service serves. Without npm the page works online only.
ORT_WEB_VERSION := 1.31.1
ORT_WEB_SHA256 := bdccdb9fbb9ab537247c0c734e9b1d2b1b338b4f2a09faa58f0dc1cfa27c312c
ORT_WEB_DIR := serve_app/static/ort
ORT_WEB_FILES := ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
ORT_WEB_STAMP := $(ORT_WEB_DIR)/.onnxruntime-web-$(ORT_WEB_VERSION)

web-runtime:
	@if [ -f $(ORT_WEB_STAMP) ]; then :; \
	elif ! command -v npm >/dev/null 2>&1; then echo "make: npm is not installed, so the page works online only \
	(Debian/Ubuntu: apt install npm, then make web-runtime)"; \
	else set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  (cd "$$tmp" && npm pack --silent onnxruntime-web@$(ORT_WEB_VERSION) >/dev/null); \
	  echo "$(ORT_WEB_SHA256)  $$tmp/onnxruntime-web-$(ORT_WEB_VERSION).tgz" | sha256sum --check --quiet; \
	  rm -rf $(ORT_WEB_DIR); mkdir -p $(ORT_WEB_DIR); \
	  tar -xzf "$$tmp/onnxruntime-web-$(ORT_WEB_VERSION).tgz" -C $(ORT_WEB_DIR) --strip-components=2 \
	    $(addprefix package/dist/,$(ORT_WEB_FILES)); \
	  tar -xzf "$$tmp/onnxruntime-web-$(ORT_WEB_VERSION).tgz" -C $(ORT_WEB_DIR) --strip-components=1 package/package.json; \
	  touch $(ORT_WEB_STAMP); echo "ONNX Runtime Web $(ORT_WEB_VERSION) in $(ORT_WEB_DIR)"; fi

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

# The tests of minutes each: the multi-node cluster (cluster/local.sh: placement, a GPU node lost, the head lost), the
# production file on one GPU, the GPU run's short form, the VGG16-BCNN at 448 with the benchmarks' skipped forward
# pass (autoscaling included), and the ExecuTorch export.
test-long: install
	$(PY) -m pytest -m long

test-fast: install
	$(PY) -m pytest -m "not slow and not cluster and not chromium and not long"

serve: install
	$(PY) -m serve_app.run

# Serve's view of the running service: `serve status` from this venv, sending the cluster's token as Ray's CLI
# does only when told to.
status: install
	RAY_AUTH_MODE=token $(VENV)/bin/serve status

# A whole collection: make classify PHOTOS=path/to/folder OUT=predictions.jsonl (run again to resume; batch/).
PHOTOS ?= ../shared/waterbirds/photos
OUT ?= predictions.jsonl
classify: install
	$(VENV)/bin/waterbirds-classify $(PHOTOS) --out $(OUT)

bench: install
	$(PY) -m load bench --docs

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
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis $(ORT_WEB_DIR)
