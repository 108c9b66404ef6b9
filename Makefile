# crackclf — run `make` (or `make help`) for the targets. Every target that needs Python creates .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
ARGS ?=
MODEL ?=
IN ?=
SHARED_DATA ?= ../shared/data/concrete_crack
DATA_ARG := $(if $(DATA),data.root=$(abspath $(DATA)),)

.DEFAULT_GOAL := help
.PHONY: help setup train sweep test test-all ui lint format clean data bench bench-data bench-infer bench-serve \
	bench-recipe predict serve compare

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv with crackclf and its dependencies

train: $(STAMP) ## train the default recipe: make train DATA=/path/to/concrete_crack [ARGS="key=value ..."]
	$(BIN)/python train.py $(DATA_ARG) $(ARGS)

sweep: $(STAMP) ## sweep the curated backbones (experiment=backbone_bench): make sweep DATA=...
	$(BIN)/python train.py -m experiment=backbone_bench $(DATA_ARG) $(ARGS)

data: $(STAMP) ## download (if needed) and verify the data set: make data [DATA=/path]
	$(if $(DATA),,$(BIN)/crackclf data download --dest data)
	$(BIN)/crackclf data verify $(if $(DATA),$(DATA),data/concrete_crack)

test: $(STAMP) ## fast tests (slow ones excluded)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP) ## every test, slow ones included
	$(BIN)/python -m pytest -q

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 over ./mlruns
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check src tests scripts train.py

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff check --fix src tests scripts train.py
	$(BIN)/ruff format src tests scripts train.py

clean: ## remove outputs, caches and build files (keeps .venv and mlruns/)
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache src/*.egg-info bench reports
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
