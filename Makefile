# rounds: developer and CI entry points (see shared DESIGN.md, "Commands").
#
#   make venv            create/refresh .venv (pinned by constraints.txt)
#   make run             rounds up, embedded default (no external services)
#   make test            venv + services, lint, typecheck, the whole pytest suite with coverage
#   make lint            ruff (lint and import order)
#   make typecheck       mypy on the package
#   make bench-micro     the hot path's micro-benchmarks (pytest-benchmark)
#   make services        make sure Redis / RabbitMQ / PostgreSQL are up
#   make bench-presence  rounds bench presence
#   make node-deps       npm deps for the Node.js interop tests (if any)
#   make system-deps     Debian packages the tests need (faketime)
#   make clean           remove .venv, var/ and caches
#
# Extra arguments: make test PYTEST_ARGS='-k presence -x'
#                  make run  RUN_ARGS='--port 9000 --shards 2'

SHELL := /bin/bash
.DEFAULT_GOAL := help

# python3.11 if present (and working: pyenv shims can exist without the
# version behind them), else python3.
PYTHON ?= $(shell for p in python3.11 python3; do \
            if command -v $$p >/dev/null 2>&1 && $$p -c '' >/dev/null 2>&1; then \
              echo $$p; break; fi; done)

VENV  := .venv
VBIN  := $(VENV)/bin
STAMP := $(VENV)/.installed

PYTEST_ARGS ?=
RUN_ARGS    ?=

# Redis the tests use (db 15, flushed per session, on the loopback server that `services` ensures).
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

# Ray must not try to phone home from tests or CI (no network here).
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help venv services run test lint typecheck bench-micro bench-presence node-deps system-deps clean

help:
	@sed -n '1,17s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# ---------------------------------------------------------------- venv ----
venv: $(STAMP)

# Rebuilt only when pyproject.toml or constraints.txt change (or on a fresh
# clone, where .venv does not exist). A .venv whose interpreter no longer runs
# (e.g. copied from another machine) is rebuilt from scratch.
$(STAMP): pyproject.toml constraints.txt
	@if [ -z "$(PYTHON)" ]; then \
	  echo "make: no working python3.11 or python3 on PATH" >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make: rounds needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1)" >&2; exit 1; }
	@if [ -d $(VENV) ] && ! $(VBIN)/python -c '' >/dev/null 2>&1; then \
	  echo "make: $(VENV) is broken, recreating it"; rm -rf $(VENV); fi
	@if [ ! -x $(VBIN)/python ]; then \
	  echo "make: creating $(VENV) with $$(command -v $(PYTHON)) ($$($(PYTHON) -V 2>&1))"; \
	  $(PYTHON) -m venv $(VENV); fi
	$(VBIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VBIN)/python -m pip install --quiet --disable-pip-version-check \
	  -c constraints.txt -e '.[test,bench]'
	@touch $@

# ------------------------------------------------------------ services ----
services:
	@bash scripts/ensure-services.sh

# ----------------------------------------------------------------- run ----
# Embedded default: no Redis/RabbitMQ/PostgreSQL needed.
run: venv
	$(VBIN)/rounds up $(RUN_ARGS)

# ---------------------------------------------------------------- lint ----
lint: venv
	$(VBIN)/ruff check rounds shard frontdoor cluster bench tests

typecheck: venv
	@bash scripts/typecheck.sh

# ---------------------------------------------------------------- test ----
# Lint and types first (seconds), then pytest with branch coverage over the
# whole gateway, its Ray actor processes included ([tool.coverage] in
# pyproject.toml); scripts/coverage_check.py then holds the floors
# (docs/coverage.md). The micro-benchmarks (bench/micro) run once each, as a
# smoke. pytest exits non-zero on failures and with 5 when it collected no
# tests; both fail make. Ray clusters are never killed here (some may not be
# ours): the tests clean up after themselves and we only warn about raylet /
# gcs_server processes that appeared during this run and are still alive.
COVERAGE_ARGS ?= --cov --cov-report=
test: venv services node-deps system-deps lint typecheck
	@ray_before=$$(pgrep -x 'raylet|gcs_server' 2>/dev/null | sort); \
	export ROUNDS_TEST_REDIS_URL='$(TEST_REDIS_URL)' ROUNDS_COVERAGE_DIR="$$PWD"; \
	rm -f .coverage .coverage.*; \
	rc=0; \
	$(VBIN)/python -m pytest -q -p no:cacheprovider $(COVERAGE_ARGS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "make test: ERROR: pytest collected no tests (exit 5)" >&2; fi; \
	if [ $$rc -eq 0 ] && [ -z "$(PYTEST_ARGS)" ] && [ -n "$(COVERAGE_ARGS)" ]; then \
	  $(VBIN)/python scripts/coverage_check.py || rc=$$?; fi; \
	if command -v pgrep >/dev/null 2>&1; then \
	  ray_after=$$(pgrep -x 'raylet|gcs_server' 2>/dev/null | sort); \
	  new=$$(comm -13 <(echo "$$ray_before") <(echo "$$ray_after") | sed '/^$$/d'); \
	  if [ -n "$$new" ]; then \
	    echo "make test: WARNING: Ray processes started during this run are still alive:" >&2; \
	    for pid in $$new; do pgrep -a -x 'raylet|gcs_server' | awk -v p=$$pid '$$1 == p' >&2; done; \
	    echo "make test: (not killed; '$(VBIN)/ray stop --force' stops ALL local Ray clusters)" >&2; \
	  fi; \
	fi; \
	exit $$rc

# --------------------------------------------------------------- bench ----
bench-micro: venv
	$(VBIN)/python -m pytest -q -p no:cacheprovider bench/micro --benchmark-enable \
	  --benchmark-columns=min,median,mean,ops --benchmark-sort=name $(PYTEST_ARGS)

bench-presence: venv
	$(VBIN)/rounds bench presence

# ---------------------------------------------------------------- node ----
node-deps:
	@bash scripts/ensure-node-deps.sh

# -------------------------------------------------------------- system ----
system-deps:
	@bash scripts/ensure-system-deps.sh

# --------------------------------------------------------------- clean ----
# bench/results/ keeps only what docs cite (bench/results/README.md) and is left alone.
clean:
	rm -rf $(VENV) var/ .pytest_cache/ .hypothesis/ .benchmarks/ *.egg-info/ .typecheck/ .typecheck-cache/ .coverage .coverage.*
	find . -path ./.git -prune -o -path '*/node_modules' -prune -o \
	  -type d -name __pycache__ -prune -exec rm -rf {} +
