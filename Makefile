# One command each: `make run` sets everything up and serves the example app;
# `make test` sets everything up and runs the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint
setup:
	./scripts/setup.sh

run: setup
	cd examples && ../$(VENV)/bin/gunicorn -c gunicorn.conf.py 'shop:create_app()'

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/mypy
