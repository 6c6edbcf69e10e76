# Everything a fresh machine needs: the venv, the package with all extras, and the checks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test compat lint typecheck pytest demo bench load clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
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

demo: $(STAMP)
	$(VENV)/bin/drum-servers demo

bench: $(STAMP)
	$(PY) benchmarks/run.py

load: $(STAMP)
	$(PY) benchmarks/load.py

clean:
	rm -rf $(VENV) .venv-compat *.egg-info .mypy_cache .ruff_cache .pytest_cache
