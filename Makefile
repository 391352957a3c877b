# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install ikos (editable) with its test and dev tools.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ikos-installed

.PHONY: demo test test-deps lint typecheck dist pytest bench clean

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; \
	  else echo "python3-venv is missing: install it (apt-get install python3-venv)" >&2; exit 1; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,examples]'
	@# the control-group spawn helper and the descriptor keeper, where there is a C
	@# compiler (else ikosd falls back to Python for them)
	-$(PY) -m ikos.platform._cgexec
	-$(PY) -m ikos.platform._fdstore
	@touch $@

demo: $(STAMP)
	$(PY) -m examples.demo --root .demo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check ikos tests examples bench grafana
	$(VENV)/bin/ruff check ikos tests examples bench grafana

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Debian packages the tests run as real daemons (nginx, redis-server, systemd-notify):
# installed when missing and root, else those tests are skipped with the reason.
test-deps:
	@sh scripts/test-deps.sh

# The sdist and wheel users install, built as they would build them (isolated, with the
# setuptools pyproject.toml asks for) and checked as PyPI checks an upload; the tests
# install these same files into clean venvs (tests/test_packaging.py). The old
# ikos.egg-info goes first: setuptools would merge its SOURCES.txt into the sdist.
DIST := dist
dist: $(STAMP)
	rm -rf $(DIST) ikos.egg-info
	$(PY) -m build --quiet --outdir $(DIST) .
	$(VENV)/bin/twine check --strict $(DIST)/*

# Ray, the optional extra behind placement=ikos.Ray (tests/test_ray.py, docs/scaling.md):
# installed where pip can (a wheel for this Python and machine), once; elsewhere those
# tests are skipped with the reason, and the base install stays light.
RAY_STAMP := $(VENV)/.ikos-ray-tried
$(RAY_STAMP): $(STAMP)
	@$(PY) -m pip install -q -e '.[ray]' || echo "ray is not installable here: tests/test_ray.py is skipped"
	@touch $@

pytest: $(STAMP) $(RAY_STAMP) test-deps dist
	IKOS_TEST_DIST_DIR=$(abspath $(DIST)) $(VENV)/bin/pytest

test: test-deps lint typecheck pytest

# The benchmarks' peers are optional (each bench skips those not installed: `pip install
# -e '.[bench]'`); matplotlib, which draws their plots, is installed here.
BENCH_STAMP := $(VENV)/.ikos-plot-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,plot]'
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .demo .mypy_cache .pytest_cache .ruff_cache build $(DIST) *.egg-info
