# Two commands set everything up on a fresh machine (python3 + make):
#   make run    install (uv + locked environment) and run the whole pipeline
#   make test   install and run the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else a project-local copy installed from the package registry.
# pip --isolated ignores this machine's pip config, whose CPU-only torch breaks torchvision.
UV := $(shell command -v uv 2>/dev/null || echo .tools/uv/bin/uv)
VENV_STAMP := .venv/.synced-$(shell cat uv.lock pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
RUN := $(UV) run --frozen --no-sync

export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# mlflow ui/server: no job runner (a process and seven huey consumers for GenAI jobs, each importing
# MLflow); the pipeline submits none.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export PYTHONUNBUFFERED := 1

.PHONY: help install run lint test suite test-fast bench mlflow-ui prefect-ui screenshots clean

help:
	@echo "make run        run the whole pipeline (Prefect flow over the DVC stages) on the embedded default"
	@echo "make test       run the linters (make lint: ruff, mypy) and the test suite side by side"
	@echo "make bench      run the benchmarks, write bench/results/*.json and bench/RESULTS.md"
	@echo "make mlflow-ui  MLflow UI on the project's store (http://127.0.0.1:5000)"
	@echo "make prefect-ui Prefect UI on the project's embedded database (http://127.0.0.1:4200; PREFECT_UI_PORT=P for another)"
	@echo "make screenshots regenerate docs/screenshots/*.png: a fresh aigc run, both UIs in headless Chromium"

.tools/uv/bin/uv:
	python3 -m pip install --isolated --quiet --disable-pip-version-check --target .tools/uv uv

# --compile-bytecode: the .pyc files written once here, not compiled again by every process (tests
# start hundreds; mlflow and prefect alone are ~7 s of compiling where PYTHONDONTWRITEBYTECODE is set).
$(VENV_STAMP): uv.lock pyproject.toml | $(if $(filter .tools/uv/bin/uv,$(UV)),.tools/uv/bin/uv)
	$(UV) sync --frozen --python 3.11 --compile-bytecode
	rm -f .venv/.synced-* && touch $@

install: $(VENV_STAMP)

run: install
	$(RUN) aigc run

# ruff (lint, format) and mypy, configured in pyproject.toml; `make test` runs them beside the suite.
lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

# pytest-xdist: a worker per core and one more (TEST_WORKERS=1 for one process: the end-to-end tests
# spend part of their time waiting on servers, kills and polls, which the extra worker fills), each test file on one worker
# (its module fixtures, servers and trainings are set up once), in the collection order, which puts
# the slow files first (tests/conftest.py; xdist would otherwise start with the files holding the
# most tests, the quick unit ones, and leave a long end-to-end file for last). PYTEST_ARGS: more options.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

# The linters run beside the suite, not before it: mypy works on one core for most of a minute,
# which the suite's workers would otherwise wait out. make stops with an error when either fails.
test: install
	@$(MAKE) --no-print-directory -j2 lint suite

suite: install
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: install
	$(RUN) pytest -m "not slow"

bench: install
	$(RUN) python -m bench

mlflow-ui: install
	$(RUN) mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# The UI's JavaScript calls the API on PREFECT_SERVER_API_PORT (default 4200), not on --port.
PREFECT_UI_PORT ?= 4200
prefect-ui: install
	PREFECT_HOME=$(CURDIR)/.prefect PREFECT_SERVER_API_PORT=$(PREFECT_UI_PORT) \
		$(RUN) prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT)

# SCREENSHOTS_ARGS: --quick (the tests' fast settings) or --project . (the stores of an earlier `make run`).
screenshots: install
	$(RUN) python -m tools.screenshots $(SCREENSHOTS_ARGS)

clean:
	rm -rf .venv .tools .prefect mlflow checkpoints data models eval registry dvc.lock .dvc/cache .dvc/tmp
