# One command each: `make run` sets up what the demo needs (a .venv-demo with the package, psycopg and
# gunicorn: no PostgreSQL server, no test or docs tools) and serves the example app;
# `make test` sets everything up and runs the whole test suite;
# `make test-ft` runs it again on free-threaded CPython 3.13t (built once, ~3-6 min).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_VENV ?= .venv-demo
FT_VENV ?= .venv-ft
FT_PY := $(FT_VENV)/bin/python

.PHONY: setup setup-demo run test lint setup-ft test-ft bench-smoke
setup:
	./scripts/setup.sh

setup-demo:
	VENV=$(DEMO_VENV) ./scripts/setup.sh --demo

run: setup-demo
	cd examples && ../$(DEMO_VENV)/bin/gunicorn -c gunicorn.conf.py 'shop:create_app()'

test: setup
	$(PY) -m pytest

setup-ft:
	VENV=$(FT_VENV) ./scripts/setup-ft.sh

# The GIL check is printed first, so the CI log shows it (tests/test_freethreaded.py asserts it too).
test-ft: setup-ft
	$(FT_PY) tests/test_freethreaded.py
	$(FT_PY) -m pytest

# Proves every benchmark still runs (about 15 s; the numbers mean nothing, nothing is asserted on them).
bench-smoke: setup setup-ft
	bench/run --smoke --no-docs
	bench/run --smoke --only ft --no-docs

lint: setup
	$(VENV)/bin/ruff check flask_proxypool tests examples bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
