# medinfer — the two commands a fresh machine needs: `make demo` and `make test`.
#   make demo: a venv with what the main job needs (CPU torch + medinfer's core
#              dependencies), then segments the bundled sample.
#   make test: adds the extras and the dev tools (pytest, dcm2niix and dcmqi from the
#              package index, ...), checks / installs the Debian test tools
#              (scripts/ensure_test_tools.sh), then runs the whole suite.
# Each install step reruns when pyproject.toml changes (stamp files in the venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_DEMO): pyproject.toml | $(PY)
	# CPU build of PyTorch first (cached on these machines); an unpinned torch pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(STAMP_DEMO)

$(STAMP_TEST): pyproject.toml $(STAMP_DEMO)
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP_TEST)

install: $(STAMP_TEST)

demo: $(STAMP_DEMO)
	$(VENV)/bin/medinfer predict samples/t1_sample.nii.gz -o outputs/demo --overlay --overwrite

test: $(STAMP_TEST)
	scripts/ensure_test_tools.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs .pytest_cache
