# Everything a fresh machine needs: the venvs, the package with the extras each job needs, and the checks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# One stamp per job, so `make demo` installs only what the demo needs (the `demo` extra).
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install test compat lint typecheck pytest smoke parity demo bench bench-nodecache bench-transport load clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $@ $(DEMO_STAMP)

install: $(TEST_STAMP)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(TEST_STAMP)
	$(VENV)/bin/mypy

pytest: $(TEST_STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

# The suite again on the oldest supported Python (3.10), when the machine has it (CI does).
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
compat:
	@if $(COMPAT_PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then \
		test -x .venv-compat/bin/python || $(COMPAT_PYTHON) -m venv .venv-compat; \
		.venv-compat/bin/python -m pip install --quiet --upgrade pip; \
		.venv-compat/bin/python -m pip install --quiet -e '.[all,test]'; \
		.venv-compat/bin/pytest -q; \
	else \
		echo "compat: no Python 3.10 ($(COMPAT_PYTHON)) on this machine, skipped"; \
	fi

# What users install is what we test: a fresh venv, a regular (non-editable) install of
# `.[all]` without the test extras, and every server variant started from it.
SMOKE_VENV ?= .venv-smoke
smoke:
	rm -rf $(SMOKE_VENV) build
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SMOKE_VENV)/bin/python -m pip install --quiet '.[all]'
	rm -rf build
	cd $(SMOKE_VENV) && bin/python $(CURDIR)/tests/smoke.py $(CURDIR)/deploy

# DRUM itself as the oracle: datarobot-drum 1.18.1 and this package in one venv of their own,
# both serving the same code dirs (tests/test_parity.py).
DRUM_VENV ?= .venv-drum
DRUM_STAMP := $(DRUM_VENV)/.installed
$(DRUM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DRUM_VENV)
	$(DRUM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DRUM_VENV)/bin/python -m pip install --quiet 'datarobot-drum==1.18.1' -e '.[flask,fastapi,gunicorn]'
	touch $@

parity: $(TEST_STAMP) $(DRUM_STAMP)
	DRUM_VENV=$(CURDIR)/$(DRUM_VENV) $(VENV)/bin/pytest -q tests/test_parity.py

demo: $(DEMO_STAMP)
	$(VENV)/bin/drum-servers demo $(if $(ADDRESS),--address $(ADDRESS))

bench: $(TEST_STAMP)
	$(PY) benchmarks/run.py

# 4 "pods" on one node with and without LAZY_LOADING_CACHE_DIR (benchmarks/NODECACHE.md); it
# fails if the cache lets the store send any object twice.
BENCH_REPS ?= 5
bench-nodecache: $(TEST_STAMP)
	$(PY) benchmarks/nodecache.py --reps $(BENCH_REPS)

# Native HTTP transports (awscrt, obstore) against ours on small files (benchmarks/TRANSPORT.md).
bench-transport: $(TEST_STAMP)
	$(PY) benchmarks/transport.py

load: $(TEST_STAMP)
	$(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) .venv-compat $(SMOKE_VENV) $(DRUM_VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
