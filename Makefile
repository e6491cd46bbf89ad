# Glyph shift study. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STEP ?= task1-step1
MODEL ?= vgg
MODELS ?= vgg resnet efficientnet hybrid
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-all lint format data analysis train bench ui reproduce clean-cache

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project with dev extras (idempotent)

test: $(STAMP) ## run the fast test suite (slow tests: make test-all)
	$(PY) -m pytest -q

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff format check and lint
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

data: $(STAMP) ## check TRAIN, TEST, TEST2 and fill the dataset cache
	$(PY) -m data_tools prepare

analysis: $(STAMP) ## data figures and reports/data_summary.md (also an MLflow run)
	$(PY) -m data_tools analyze

train: $(STAMP) ## train one model on one step: make train STEP=task1-step1 MODEL=vgg ARGS='--set lr=3e-3'
	$(PY) -m experiments train --step $(STEP) --model $(MODEL) $(ARGS)

bench: $(STAMP) ## data-loading benchmark side by side; writes reports/bench.md
	$(PY) -m experiments bench

ui: $(STAMP) ## open the MLflow UI on the project's store at http://127.0.0.1:5000
	@mkdir -p $(or $(MLRUNS_DIR),mlruns)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri "$$($(PY) -c 'from experiments import config; print(config.tracking_uri())')"

reproduce: $(STAMP) data analysis ## the main job (for now: data preparation and analysis; training lands with the search issue)
	@echo "reproduce: data preparation and analysis done; searches and the report are not built yet (issue 4)"

clean-cache: ## delete the dataset cache (data/cache)
	rm -rf data/cache
