# Glyph shift study. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
#: STEP=task1-step1      the step of `make train` (python -m experiments steps)
STEP ?= task1-step1
#: MODELS="vgg resnet"    the models of a command (default: every registered one); MODEL is the same
MODEL ?=
MODELS ?= $(MODEL)
#: TRIALS= EPOCHS=        a study's trials and epochs per trial (default: the budget profile's)
TRIALS ?=
EPOCHS ?=
#: PROFILE=quick|cpu|full|gpu   the budget (default: gpu where CUDA is available, else cpu); full also seeds each answer twice more
PROFILE ?=
#: JOBS=2                 studies run at once by reproduce (default: one per core, at most 8)
#: WORKERS=1              processes sharing one study
WORKERS ?=
#: ENSEMBLE=3 TTA=0|1     the report's ensembles (best K of each step) and their TTA twins
ENSEMBLE ?=
TTA ?= 0
#: ARGS='--set lr=3e-3'   more flags for train and the study commands
ARGS ?=
#: IN= OUT= MODEL_URI=    predict's input, output CSV and model (default: the Task 2 champion)
#: CACHE_DIR= DATA_DIR= MLRUNS_DIR= REPORTS_DIR=   where the cache, the data, the store and reports live
yes_no = $(if $(filter 1 yes true,$(1)),1,$(if $(filter 0 no false,$(1)),,$(error $(2)=$(1): expected 1 or 0)))
REPORT_FLAGS = $(if $(ENSEMBLE),--ensemble $(ENSEMBLE)) $(if $(call yes_no,$(TTA),TTA),--tta)
SEARCH_FLAGS = $(if $(TRIALS),--trials $(TRIALS)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)
MODEL_FLAGS = $(foreach m,$(MODELS),--model $(m))
# `make reproduce` runs one job per chain (CHAIN_<name>, REPRODUCE_CHAINS in
# experiments/core/steps.py): a model's studies of one task in one process (imports, data and
# caches set up once), each after the study it builds on (AFTER_<step>). JOBS chains at a time (default: one per core,
# at most 8), each on nproc / JOBS threads, in STUDY_ORDER (the slowest models first): a free
# core takes the next chain, so the longest chains start first and the last ones end close
# together. MODELS=... keeps only those models; JOBS=1: one at a time. Each study is also a
# target of its own (study.<step>.<model>, after its source: AFTER_<step>), run on every core
# (STUDY_THREADS). The jobs' lines interleave as they come (each names its study).
# the registered models (most expensive first) and the steps (every declared step, reproduce's
# STEPS, CHAINS, CHAIN_<name>, AFTER_<step>, RECIPE_STEPS and MODELS_<recipe step>), read from
# the code (python -m experiments steps --make) into $(REGISTRY_MK), refreshed when a model
# file is added, removed or changed, or the steps change (empty before `make setup`)
REGISTRY_PY ?= $(VENV)/bin/python
REGISTRY_MK := $(VENV)/registry.mk
ALL_MODELS :=
DECLARED_STEPS :=
STEPS :=
CHAINS :=
RECIPE_STEPS :=
ifneq ($(wildcard $(STAMP)),)
-include $(REGISTRY_MK)
endif
STUDY_ORDER ?= $(ALL_MODELS)# slowest first: each model's `cost` in @register_model
NPROC := $(shell nproc 2>/dev/null || echo 1)
SELECTED := $(filter $(or $(MODELS),$(ALL_MODELS)),$(STUDY_ORDER))
JOBS ?= $(shell n=$(NPROC); echo $$(( n > 8 ? 8 : (n > 0 ? n : 1) )))
STUDY_GOALS := $(foreach m,$(SELECTED),$(foreach c,$(CHAINS),chain.$(c).$(m)))
# the cores are shared by the jobs that can run at once: no more than there are chains
PARALLEL_THREADS := $(shell j=$(JOBS); g=$(words $(STUDY_GOALS)); j=$$(( j < g ? j : g )); \
	t=$$(( $(NPROC) / (j > 0 ? j : 1) )); echo $$(( t > 0 ? t : 1 )))
STUDY_THREADS ?= $(NPROC)# a study run by hand (make study.task1-step1.vgg) gets every core
search_command = OMP_NUM_THREADS=$(STUDY_THREADS) $(PY) -m experiments search --step $(1) --model $(2) $(SEARCH_FLAGS)
define study_rule
study.$(1).$(2): $$(STAMP) $(if $(AFTER_$(1)),study.$(AFTER_$(1)).$(2))
	$$(call search_command,$(1),$(2))
endef
define chain_rule
chain.$(1).$(2): $$(STAMP)
	$$(call search_command,$(firstword $(CHAIN_$(1)))$(foreach s,$(wordlist 2,9,$(CHAIN_$(1))), --step $(s)),$(2))
endef
RECIPE_MODELS := $(foreach s,$(RECIPE_STEPS),$(MODELS_$(s)))
$(foreach s,$(STEPS),$(foreach m,$(ALL_MODELS),$(eval $(call study_rule,$(s),$(m)))))
$(foreach s,$(RECIPE_STEPS),$(foreach m,$(MODELS_$(s)),$(eval $(call study_rule,$(s),$(m)))))
$(foreach c,$(CHAINS),$(foreach m,$(ALL_MODELS),$(eval $(call chain_rule,$(c),$(m)))))
CHECK_MODELS = $(if $(SELECTED),,$(error MODELS=$(MODELS): none of them is a registered model ($(ALL_MODELS))))\
	$(if $(filter-out $(SELECTED),$(MODELS)),$(error MODELS=$(MODELS): $(filter-out $(SELECTED),$(MODELS)) is not a registered model ($(ALL_MODELS))))\
	$(if $(and $(filter-out 0 00,$(JOBS)),$(if $(call non_digits,$(JOBS)),,ok)),,$(error JOBS=$(JOBS): expected a number of jobs >= 1))
non_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))

.DEFAULT_GOAL := help
.PHONY: $(foreach s,$(STEPS),$(foreach m,$(ALL_MODELS),study.$(s).$(m))) $(foreach c,$(CHAINS),$(foreach m,$(ALL_MODELS),chain.$(c).$(m))) $(foreach s,$(RECIPE_STEPS),$(foreach m,$(MODELS_$(s)),study.$(s).$(m))) studies levers gpu-bench fetch progress promote task2-champion task2-champion-studies predict fidelity help setup lock test test-all lint format data analysis train report bench ui dashboard serve check-args seeds full-seeds \
	reproduce beyond cluster-test clean-cache task1-shift task2-long task2-transfer

help: ## list the targets by workflow, then the variables
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} \
	  /^[a-zA-Z0-9_.-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  <step>           any declared step, e.g. make task2-step3 MODELS=resnet: $(DECLARED_STEPS)"
	@printf "\nVariables (make TARGET VAR=value)\n"
	@awk '/^#: / {printf "  %s\n", substr($$0, 4)}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

##@ Start

# reproduce's steps run in sub-makes, which read the registry once `make setup` has run;
# REPRODUCE_STARTED is read when make starts (before installing): the operating point's wall time
REPRODUCE_STARTED := $(shell date +%s)
reproduce: $(STAMP) ## the whole study: installs, fetches the data when none are found, then every study as its chains (JOBS at a time) and the analysis, then the report
	$(MAKE) --no-print-directory check-args
	$(PY) -m data_tools fetch --if-missing
	$(MAKE) --no-print-directory data
	@date +%s > $(VENV)/.reproduce-setup-done
	$(MAKE) --no-print-directory studies WITH_STUDIES=analysis
	$(if $(filter full,$(PROFILE)),$(MAKE) --no-print-directory full-seeds)
	$(MAKE) --no-print-directory report
	$(PY) -m experiments points --profile $(or $(PROFILE),auto) --started $(REPRODUCE_STARTED) \
		--setup-done "$$(cat $(VENV)/.reproduce-setup-done)"

setup: $(STAMP) ## create .venv and install the project with dev extras, versions pinned by requirements.lock

fetch: $(STAMP) ## clone the datasets published with the original study into data/raw (never overwrites)
	$(PY) -m data_tools fetch

data: $(STAMP) ## check TRAIN, TEST, TEST2 and fill the dataset cache
	$(PY) -m data_tools prepare

check-args: $(STAMP)
	@$(CHECK_MODELS)true

test: $(STAMP) ## run the fast test suite on two processes, one thread each (slow tests: make test-all)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

##@ Study steps (each declared step is also a target: make task2-step3 MODELS=resnet)

WITH_STUDIES ?=# goals run beside the studies (reproduce: analysis)
studies: $(STAMP) ## every study of reproduce as its chains, JOBS chains at a time, sources first (MODELS=... filters)
	$(CHECK_MODELS)
	@echo "$(words $(STUDY_GOALS)) goals, $(JOBS) job(s) at a time, $(PARALLEL_THREADS) thread(s) each"
	$(MAKE) --no-print-directory -j$(JOBS) $(STUDY_GOALS) $(WITH_STUDIES) STUDY_THREADS=$(PARALLEL_THREADS)

train: $(STAMP) ## train one model on one step: make train STEP=task1-step1 MODELS=vgg ARGS='--set lr=3e-3'
	$(if $(filter 1,$(words $(MODELS))),,$(error train: MODELS=$(MODELS): name exactly one model))
	$(PY) -m experiments train --step $(STEP) --model $(MODELS) $(ARGS)

#: SEEDS=2                more seeds of each study answer (make seeds STEP=... MODELS=...)
SEEDS ?= 2
SEEDED_STEPS = $(filter-out task2-step1,$(STEPS))# the steps whose studies train (full's seeds)
FULL_SEEDS ?= 2
# PROFILE=full: FULL_SEEDS more seeds of every trained answer, one goal per missing seed, all
# steps at once, longest first (`seeds --plan`), min(JOBS, goals) at a time, the cores shared
# among them; `make -n` lists every seed goal instead (the plan reads the store)
FULL_SEED_GOALS = $(foreach s,$(SEEDED_STEPS),$(foreach m,$(SELECTED),$(foreach k,$(shell seq $(FULL_SEEDS)),seed.$(s).$(m).$(k))))
DRY_RUN = $(findstring n,$(firstword -$(MAKEFLAGS)))
full-seeds: $(STAMP)
	$(CHECK_MODELS)
ifneq (,$(DRY_RUN))
	$(MAKE) --no-print-directory -j$(JOBS) $(FULL_SEED_GOALS) STUDY_THREADS=1
else
	goals=$$($(PY) -m experiments seeds --plan $(foreach s,$(SEEDED_STEPS),--step $(s)) \
		$(foreach m,$(SELECTED),--model $(m)) --seeds $(FULL_SEEDS)) || exit 1; \
	n=$$(echo $$goals | wc -w); j=$$(( $(JOBS) < n ? $(JOBS) : n )); \
	t=$$(( $(NPROC) / (j > 0 ? j : 1) )); t=$$(( t > 0 ? t : 1 )); \
	echo "$$n seed runs to train, $$j at a time, $$t thread(s) each"; \
	[ "$$n" -eq 0 ] || $(MAKE) --no-print-directory -j$(JOBS) \
		$$(printf 'seed.%s ' $$goals) STUDY_THREADS=$$t
endif

seed.%: $(STAMP)
	OMP_NUM_THREADS=$(STUDY_THREADS) $(PY) -m experiments seeds --step $(word 1,$(subst ., ,$*)) --model $(word 2,$(subst ., ,$*)) --seeds $(FULL_SEEDS) --only $(word 3,$(subst ., ,$*))
SEED_GOALS = $(foreach m,$(SELECTED),seeds.$(STEP).$(m))
SEED_THREADS = $(shell j=$(JOBS); g=$(words $(SEED_GOALS)); j=$$(( j < g ? j : g )); \
	t=$$(( $(NPROC) / (j > 0 ? j : 1) )); echo $$(( t > 0 ? t : 1 )))
seeds: $(STAMP) ## retrain STEP's study answers of MODELS with SEEDS more seeds, JOBS at a time (the report shows mean ± sd)
	$(CHECK_MODELS)
	$(if $(filter $(STEP),$(DECLARED_STEPS)),,$(error STEP=$(STEP): not a declared step ($(DECLARED_STEPS))))
	$(MAKE) --no-print-directory -j$(JOBS) $(SEED_GOALS) STUDY_THREADS=$(SEED_THREADS)

seeds.%: $(STAMP)
	OMP_NUM_THREADS=$(STUDY_THREADS) $(PY) -m experiments seeds --step $(word 1,$(subst ., ,$*)) --model $(word 2,$(subst ., ,$*)) --seeds $(SEEDS)

task2-champion: $(STAMP) ## Task 2 end to end: the SELECT2-validated studies (task2-step3, task2-step2) and the hand-set recipe (task2-recipe), JOBS at a time, then the champion registered
	$(MAKE) --no-print-directory check-args
	$(MAKE) --no-print-directory data
	$(MAKE) --no-print-directory task2-champion-studies
	$(PY) -m experiments promote --task 2

task2-champion-studies: $(STAMP)
	$(CHECK_MODELS)
	$(MAKE) --no-print-directory -j$(JOBS) STUDY_THREADS=$(PARALLEL_THREADS) \
	  $(foreach s,$(RECIPE_STEPS),$(foreach m,$(filter $(MODELS_$(s)),$(SELECTED)),study.$(s).$(m))) \
	  $(foreach m,$(SELECTED),study.task2-step2.$(m))

task1-shift: $(STAMP) ## Task 1: new-script detectors (AUROC), selective prediction, self-training, label-efficiency curve
	$(PY) -m experiments shift $(MODEL_FLAGS)

task2-transfer: $(STAMP) ## studies fine-tuning the TRAIN models on TEST, and on TRAIN3 (to_black) -> TEST2
	$(PY) -m experiments search --step task2-transfer $(MODEL_FLAGS) $(SEARCH_FLAGS)
	$(PY) -m experiments search --step task2-transfer-white $(MODEL_FLAGS) $(SEARCH_FLAGS)

task2-long: task2-step3-long ## the task2-step3 winners retrained for 40 epochs (no search)

beyond: $(STAMP) ## after reproduce: task2-mixed, task2-long, task2-transfer, task1-shift, report with TTA
	$(MAKE) --no-print-directory task2-mixed task2-long task2-transfer task1-shift
	$(MAKE) --no-print-directory report TTA=1

##@ Results and models

progress: $(STAMP) ## where make reproduce stands: each study's state, trials, answer and seeds; lane-minutes so far
	$(PY) -m experiments progress

report: $(STAMP) ## comparison table, ensembles (ENSEMBLE=K, default 3; TTA=1 adds TTA), Task 1/2 findings into reports/
	$(PY) -m experiments report $(REPORT_FLAGS)

promote: $(STAMP) ## register each task's champion in the MLflow Model Registry (glyph-task1/2 @champion)
	$(PY) -m experiments promote

IN ?=
MODEL_URI ?= models:/glyph-task2@champion
predict: $(STAMP) ## predictions for IN=<.npy file, folder or dataset folder> with MODEL_URI (default the Task 2 champion)
	$(PY) -m experiments predict $(IN) --model $(MODEL_URI) --out $(or $(OUT),predictions.csv)

##@ Inspect

#: UI_PORT=5000 DASHBOARD_PORT=8080 SERVE_PORT=5001   the ports of ui, dashboard and serve (on 127.0.0.1)
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
SERVE_PORT ?= 5001
ui: $(STAMP) ## open the MLflow UI on the project's store (MLRUNS_DIR) at http://127.0.0.1:$(UI_PORT)
	$(PY) -m experiments ui --port $(UI_PORT)

dashboard: $(STAMP) ## open optuna-dashboard on the study storage at http://127.0.0.1:$(DASHBOARD_PORT)
	$(PY) -m experiments dashboard --port $(DASHBOARD_PORT)

serve: $(STAMP) ## serve MODEL_URI (default the Task 2 champion) at http://127.0.0.1:$(SERVE_PORT)/invocations, its files checked first
	$(PY) -m experiments serve --model $(MODEL_URI) --port $(SERVE_PORT)

analysis: $(STAMP) ## data figures and reports/data_summary.md (also an MLflow run)
	$(PY) -m experiments analyze

bench: $(STAMP) ## data loading, training throughput and MFU vs the reference pipeline, precision, prediction batch, depthwise weight gradient, MLflow share; reports/bench.md (BENCH_FULL=1 also times reproduce)
	$(PY) -m experiments bench

gpu-bench: $(STAMP) ## on a GPU (<= 8 min): training images/s per model at batch 128 and 512, make reproduce PROFILE=gpu, utilisation; appends to reports/gpu.md (GPU_BENCH_FLAGS=--tiny on a CPU)
	$(PY) -m experiments gpu-bench $(GPU_BENCH_FLAGS)

#: GPU_KIT=build/gpu-kit  where make gpu-kit writes the kit folder and its .tar
GPU_KIT ?= build/gpu-kit
.PHONY: gpu-kit
gpu-kit: $(STAMP) ## a GPU node with PyTorch and no internet: wheels, packed data, source and run.sh in one folder and .tar (<= 60 MB) under GPU_KIT
	$(PY) -m experiments.bench.kit build --out $(GPU_KIT)

fidelity: $(STAMP) ## slow: trial-score vs final-score rank correlation per fidelity, into reports/fidelity.md and MLflow
	$(PY) -m experiments fidelity

LEVER_ROUND ?= 2
levers: $(STAMP) ## slow: one round of Task 2 levers (LEVER_ROUND=1: EMA, elastic; 2: mixup, cutmix, SWA, width 32) on the recipe, judged on SELECT2, into reports/levers.md and MLflow
	LEVER_ROUND=$(LEVER_ROUND) $(PY) -m experiments levers

##@ Develop

lint: $(STAMP) ## ruff format check and lint, and the import-layer contracts (lint-imports)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q -m ''

lock: ## refresh requirements.lock from a fresh resolve of pyproject.toml's ranges
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^glyph-shift' > requirements.lock
	rm -rf .venv-lock

cluster-test: $(STAMP) ## PostgreSQL + MLflow server + 2 workers on a tiny study (installs PostgreSQL if absent)
	$(PY) -m pytest -q -m slow tests/test_cluster.py

clean-cache: ## delete the dataset cache ($$CACHE_DIR, default data/cache)
	rm -rf $(or $(CACHE_DIR),data/cache)

# every declared step is a target of its own: its studies for MODELS (search, reuse, retrain or
# fine-tune); a name that is not a declared step is no target
define step_rule
$(1): $$(STAMP)
	$$(PY) -m experiments search --step $(1) $$(foreach m,$$(or $$(MODELS),$$(MODELS_$(1))),--model $$(m)) $$(SEARCH_FLAGS)
endef
$(foreach s,$(filter-out task2-transfer,$(DECLARED_STEPS)),$(eval $(call step_rule,$(s))))

$(REGISTRY_MK): $(STAMP) models $(wildcard models/*.py) experiments/core/steps.py
	{ printf 'ALL_MODELS := '; $(REGISTRY_PY) -m models list --names; \
	  $(REGISTRY_PY) -m experiments steps --make; } > $@.$$$$ \
	  && mv $@.$$$$ $@
