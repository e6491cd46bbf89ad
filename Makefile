# Glyph shift study. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STEP ?= task1-step1
MODEL ?= vgg
MODELS ?=# empty: every registered model (python -m models list)
ARGS ?=
TRIALS ?=
EPOCHS ?=
WORKERS ?=
ENSEMBLE ?= 3
TTA ?=
REPORT_FLAGS = --ensemble $(ENSEMBLE) $(if $(TTA),--tta)
SEARCH_FLAGS = $(if $(TRIALS),--trials $(TRIALS)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(ARGS)
MODEL_FLAGS = $(foreach m,$(MODELS),--model $(m))
# the steps of `make reproduce`; every declared step (python -m experiments steps) is a target
STEPS := task1-step1 task1-step2 task2-step1 task2-step3 task2-step2  # task2-step2 warm-starts from task2-step3
# `make reproduce` runs one lane per entry side by side, each all STEPS for its models ('+'-joined),
# one after another (a shell loop: make's job slots never start two of a lane's steps at once), on its share of the cores: a model's chain (step2
# warm-starts from step1) stays in one lane, and the lanes are balanced by cost (vgg and
# efficientnet train slowest). MODELS=... keeps only those models; LANES=all: one lane.
# The lanes' lines interleave as they come (each names its study); make's --output-sync would
# hold a lane's output back until the lane ends.
ALL_MODELS := vgg resnet efficientnet hybrid# the registry (python -m models list; a test checks)
LANES ?= vgg+hybrid efficientnet+resnet
NPROC := $(shell nproc 2>/dev/null || echo 1)
SELECTED := $(or $(MODELS),$(ALL_MODELS))
SPACE := $() $()
LANE_LIST := $(if $(filter all,$(LANES)),$(subst $(SPACE),+,$(strip $(SELECTED))),$(strip \
	$(foreach lane,$(LANES),$(subst $(SPACE),+,$(strip $(filter $(SELECTED),$(subst +, ,$(lane))))))))
# threads per lane: the cores shared among reproduce's lanes; a lane run by hand gets them all
LANE_COUNT := $(words $(LANE_LIST))
REPRODUCE_THREADS := $(shell n=$(LANE_COUNT); n=$$(( n > 0 ? n : 1 )); t=$$(( $(NPROC) / n )); echo $$(( t > 0 ? t : 1 )))
LANE_THREADS ?= $(NPROC)

.DEFAULT_GOAL := help
.PHONY: levers promote task2-champion predict fidelity help setup lock test test-all lint format data analysis train search report bench ui dashboard \
	reproduce beyond cluster-test clean-cache task1-shift task2-long task2-transfer

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "  task steps (each a target, e.g. make task2-step3 MODELS=resnet): see python -m experiments steps"

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project with dev extras, versions pinned by requirements.lock

lock: ## refresh requirements.lock from a fresh resolve of pyproject.toml's ranges
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^glyph-shift' > requirements.lock
	rm -rf .venv-lock

test: $(STAMP) ## run the fast test suite on two processes, one thread each (slow tests: make test-all)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff format check and lint, and the import-layer contracts (lint-imports)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

data: $(STAMP) ## check TRAIN, TEST, TEST2 and fill the dataset cache
	$(PY) -m data_tools prepare

analysis: $(STAMP) ## data figures and reports/data_summary.md (also an MLflow run)
	$(PY) -m experiments analyze

train: $(STAMP) ## train one model on one step: make train STEP=task1-step1 MODEL=vgg ARGS='--set lr=3e-3'
	$(PY) -m experiments train --step $(STEP) --model $(MODEL) $(ARGS)

search: $(STAMP) ## one study: make search STEP=task2-step3 MODEL=resnet [TRIALS=5 EPOCHS=3 WORKERS=2]
	$(PY) -m experiments search --step $(STEP) --model $(MODEL) $(SEARCH_FLAGS)

task1-shift: $(STAMP) ## Task 1: new-script detectors (AUROC), selective prediction, self-training, label-efficiency curve
	$(PY) -m experiments shift $(MODEL_FLAGS)

task2-transfer: $(STAMP) ## studies fine-tuning the TRAIN models on TEST, and on TRAIN3 (to_black) -> TEST2
	$(PY) -m experiments search --step task2-transfer $(MODEL_FLAGS) $(SEARCH_FLAGS)
	$(PY) -m experiments search --step task2-transfer-white $(MODEL_FLAGS) $(SEARCH_FLAGS)

task2-long: task2-step3-long ## the task2-step3 winners retrained for 40 epochs (no search)

task%: $(STAMP) ## any declared step: its studies for MODELS (search, reuse, retrain or fine-tune)
	$(PY) -m experiments search --step $@ $(MODEL_FLAGS) $(SEARCH_FLAGS)

report: $(STAMP) ## comparison table, ensembles (ENSEMBLE=3; TTA=1 adds TTA), Task 1/2 findings into reports/
	$(PY) -m experiments report $(REPORT_FLAGS)

promote: $(STAMP) ## register each task's champion in the MLflow Model Registry (glyph-task1/2 @champion)
	$(PY) -m experiments promote

task2-champion: $(STAMP) ## Task 2 end to end: the SELECT2-validated studies (task2-step3, task2-step2), then the champion registered
	$(MAKE) --no-print-directory task2-step3 task2-step2
	$(PY) -m experiments promote --task 2

IN ?=
MODEL_URI ?= models:/glyph-task2@champion
predict: $(STAMP) ## predictions for IN=<.npy file, folder or dataset folder> with MODEL_URI (default the Task 2 champion)
	$(PY) -m experiments predict $(IN) --model $(MODEL_URI) --out $(or $(OUT),predictions.csv)

fidelity: $(STAMP) ## slow: trial-score vs final-score rank correlation per fidelity, into reports/bench.md
	$(PY) -m experiments bench --only fidelity

levers: $(STAMP) ## slow: Task 2 levers (EMA, elastic) on one recipe, judged on SELECT2, into reports/levers.md
	$(PY) -m experiments bench --only levers

bench: $(STAMP) ## data loading, training throughput and MFU vs the reference pipeline, MLflow share; reports/bench.md (BENCH_FULL=1 also times reproduce)
	$(PY) -m experiments bench

ui: $(STAMP) ## open the MLflow UI on the project's store at http://127.0.0.1:5000
	@mkdir -p $(or $(MLRUNS_DIR),mlruns)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri "$$($(PY) -c 'from experiments import config; print(config.tracking_uri())')"

dashboard: $(STAMP) ## open optuna-dashboard on the study storage at http://127.0.0.1:8080
	$(PY) -m experiments dashboard

reproduce: $(STAMP) ## the whole study: data, analysis, all five steps' studies (LANES side by side), the report
	$(if $(LANE_LIST),,$(error MODELS=$(MODELS): none of them is in LANES=$(LANES)))
	$(MAKE) --no-print-directory data analysis
	$(MAKE) --no-print-directory -j$(LANE_COUNT) $(addprefix lane-,$(LANE_LIST)) \
	  LANE_THREADS=$(REPRODUCE_THREADS)
	$(MAKE) --no-print-directory report

lane-%: $(STAMP) ## every step of `make reproduce` for the '+'-joined models, on this lane's threads
	@echo "lane $*: $(STEPS) on $(LANE_THREADS) thread(s)"
	for step in $(STEPS); do \
	  OMP_NUM_THREADS=$(LANE_THREADS) $(MAKE) --no-print-directory $$step MODELS="$(subst +, ,$*)" || exit 1; \
	done

beyond: $(STAMP) ## after reproduce: task2-mixed, task2-long, task2-transfer, task1-shift, report with TTA
	$(MAKE) --no-print-directory task2-mixed task2-long task2-transfer task1-shift
	$(MAKE) --no-print-directory report TTA=1

cluster-test: $(STAMP) ## PostgreSQL + MLflow server + 2 workers on a tiny study (installs PostgreSQL if absent)
	$(PY) -m pytest -q -m slow tests/test_cluster.py

clean-cache: ## delete the dataset cache (data/cache)
	rm -rf data/cache
