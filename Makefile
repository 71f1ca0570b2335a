# Strongroom developer entry points. `make demo` and `make test` set everything up first.
SHELL := /bin/bash
export ORT_DISABLE_TELEMETRY := 1
# The step-ca that `make setup` builds; tests and the demo start it.
export STRONGROOM_STEP_CA ?= $(CURDIR)/.build/bin/step-ca
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .build/tools

.PHONY: setup demo test lint typecheck protolint deploycheck unit bench soak clean

setup:
	@deploy/dev/setup.sh

demo: setup
	@$(VENV)/bin/strongroom demo

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check . >/dev/null || { $(VENV)/bin/ruff format --diff . | head -40; exit 1; }

typecheck: setup
	@$(PY) dev/srctree.py .build/src
	@$(VENV)/bin/mypy

protolint: setup
	@cd protos && ../$(TOOLS)/node_modules/.bin/buf lint
	@protos/breaking.sh

deploycheck: setup
	@deploy/check.sh

# Two test processes (pytest-xdist): the suite waits on subprocesses, fsyncs and sockets about half
# the time, so two keep both cores busy (22:54 alone, 12:25 with two, on this 2-core machine).
# `make unit PYTEST_WORKERS=` runs it in one process.
PYTEST_WORKERS ?= -n 2 --dist worksteal

unit: setup
	@$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test: lint typecheck protolint deploycheck unit

soak: setup
	@$(PY) -m tests.soak.run $(SOAK_ARGS)

bench: setup
	@$(PY) -m tests.bench.run $(BENCH_ARGS)

clean:
	rm -rf .build protos/_gen .pytest_cache .mypy_cache .ruff_cache services/keybroker/_p11release.*.so
