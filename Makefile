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
.PHONY: help setup lock check-lock train sweep test test-all ui lint format clean data bench bench-data bench-infer \
	bench-serve bench-recipe bench-coldstart bench-shift bench-transfer bench-adapt adapt predict serve compare browser

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

# .venv = exactly requirements.lock (pip only, every file hash-checked), then crackclf itself, editable, without
# dependencies; the lock pins setuptools (torch needs it), so the editable build uses it instead of fetching one.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP) ## create .venv with the exact versions of requirements.lock + crackclf (editable)

# The lock is compiled by uv (`uv pip compile`): fast, the resolver used across the Python ecosystem today, and it
# writes a pip-compatible requirements file with --hash lines that plain pip installs (torch, torchvision and the
# nvidia-* wheels from this machine's local file indexes, the rest from PyPI). uv lives in its own scratch venv,
# not in .venv (which must stay exactly the lock). uv does not read pip's config, so the indexes are passed here:
# PyPI first (its pages list every file of a release, so all its hashes go in), then the local file indexes
# (releases only they hold); pip's configured constraint file, when there is one, constrains uv too. The existing
# lock's pins are kept (uv reads the output file as preferences): `make lock UPGRADE=1` moves everything to the
# newest versions pyproject.toml allows; LOCK_CONSTRAINTS=<file> (e.g. a `pip freeze --exclude-editable`) pins
# versions. The preferences are given without their hashes (uv would copy those over unchecked; every hash is
# fetched afresh), and the lock is replaced only when it changed (so .venv is not reinstalled for nothing).
# pyproject.toml keeps its ranges for people who install crackclf as a library.
UV_VERSION ?= 0.13.9
UV_VENV := .cache/uv
UV ?= $(UV_VENV)/bin/uv
LOCK_PYTHON ?= 3.11
LOCK_PLATFORM ?= x86_64-manylinux_2_36
LOCK_INDEXES ?= --extra-index-url https://pypi.org/simple \
	$(foreach d,/opt/pypi /opt/pypi-more,$(if $(wildcard $(d)/simple),--extra-index-url file://$(d)/simple))
PIP_CONSTRAINT_FILE := $(wildcard /etc/xdg/pip/constraints.txt)
LOCAL_WHEEL_DIRS := $(wildcard /opt/pypi/files /opt/pypi-more/files /opt/wheels)

$(UV_VENV)/bin/uv:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q uv==$(UV_VERSION)

lock: $(if $(filter $(UV_VENV)/bin/uv,$(UV)),$(UV_VENV)/bin/uv) ## regenerate requirements.lock with uv [UPGRADE=1] [LOCK_CONSTRAINTS=freeze.txt]
	@sed -e '/--hash=/d' -e 's/ \\$$//' requirements.lock > requirements.lock.new 2>/dev/null || true
	$(UV) pip compile pyproject.toml --extra dev --generate-hashes --quiet \
		--python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) \
		$(LOCK_INDEXES) --index-strategy unsafe-best-match \
		$(if $(PIP_CONSTRAINT_FILE),--constraints $(PIP_CONSTRAINT_FILE)) \
		$(if $(LOCK_CONSTRAINTS),--constraints $(LOCK_CONSTRAINTS)) $(if $(UPGRADE),--upgrade) \
		--custom-compile-command 'make lock' -o requirements.lock.new || { rm -f requirements.lock.new; exit 1; }
	@if cmp -s requirements.lock.new requirements.lock; then rm requirements.lock.new; echo "requirements.lock: unchanged"; \
	else mv requirements.lock.new requirements.lock; echo "requirements.lock: updated (make setup installs it)"; fi

check-lock: $(STAMP) ## .venv == requirements.lock (pip freeze), and the local wheels' hashes are in the lock
	$(BIN)/python scripts/check_lock.py requirements.lock $(addprefix --wheel-dir ,$(LOCAL_WHEEL_DIRS))

train: $(STAMP) ## train the default recipe (experiment=cpu_fast, <= 5 min): make train DATA=/path/to/concrete_crack [ARGS="key=value ..."]
	$(BIN)/python train.py experiment=cpu_fast $(DATA_ARG) $(ARGS)

adapt: $(STAMP) ## adapt MODEL to a new surface from a few labelled photos: make adapt MODEL=<model> DATA=<labelled folder> [REPLAY=<original data>]
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make adapt MODEL=<best.ckpt|runs:/id|models:/name/v> DATA=<folder with no_crack/ crack/> [REPLAY=<the original data set>] [ARGS=...]"; exit 2; }
	$(BIN)/python train.py experiment=adapt init_from=$(MODEL) adapt.data=$(abspath $(DATA)) $(if $(REPLAY),adapt.replay=$(abspath $(REPLAY))) $(ARGS)

sweep: $(STAMP) ## sweep the curated backbones (experiment=backbone_bench): make sweep DATA=... [ARGS=...]
	$(BIN)/python train.py -m experiment=backbone_bench $(DATA_ARG) $(ARGS)

compare: $(STAMP) ## runs from MLflow -> reports/compare-*.md + .png: make compare [SWEEP=latest|ID] [ARGS="--tag k=v"]
	$(BIN)/crackclf compare --experiment $(or $(EXPERIMENT),crack) $(if $(SWEEP),--sweep $(SWEEP),) --out reports $(ARGS)

data: $(STAMP) ## download (if needed) and verify the data set: make data [DATA=/path]
	$(if $(DATA),,$(BIN)/crackclf data download --dest data)
	$(BIN)/crackclf data verify $(if $(DATA),$(DATA),data/concrete_crack)

bench-data: $(STAMP) ## data path (cache + batch augment) vs ImageFolder+PIL, img/s: make bench-data [DATA=...]
	$(BIN)/python scripts/bench_data.py --data $(or $(DATA),$(SHARED_DATA)) --out bench/bench_data.json $(ARGS)

bench: bench-data bench-recipe ## the benchmarks that need no trained model (bench-infer/bench-serve take MODEL=)

bench-recipe: $(STAMP) ## default recipe from a cold start, 3 runs, wall time + accuracy: make bench-recipe [DATA=...] [RUNS=3]
	$(BIN)/python scripts/bench_recipe.py --data $(if $(DATA),$(DATA),$(SHARED_DATA)) --runs $(or $(RUNS),3) $(ARGS)

bench-coldstart: $(STAMP) ## where a cold start goes: scan, near-duplicates, split, caches, timed from an empty cache [DATA=...]
	$(BIN)/python scripts/bench_coldstart.py --data $(or $(DATA),$(SHARED_DATA)) --out bench/coldstart.json $(ARGS)

bench-infer: $(STAMP) ## eager vs ONNX Runtime (batch 1/32); predict vs bare decode rate: make bench-infer [MODEL=...]
	$(BIN)/python scripts/bench_infer.py --data $(or $(DATA),$(SHARED_DATA)) $(if $(MODEL),--model $(MODEL),) \
		--out bench/bench_infer.json $(ARGS)

predict: $(STAMP) ## classify images/folders/globs: make predict IN=photos/ MODEL=<ckpt|runs:/id|models:/name/v> [ARGS=...]
	@test -n "$(IN)" -a -n "$(MODEL)" || { echo "usage: make predict IN=<files or folders> MODEL=<model> [ARGS=...]"; exit 2; }
	$(BIN)/crackclf predict --model $(MODEL) $(IN) $(ARGS)

serve: $(STAMP) ## web page + HTTP API on http://127.0.0.1:8000: make serve MODEL=<ckpt|.onnx|runs:/id|models:/name/v> [ARGS="--port 8080"]
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=<model> [ARGS=\"--host 0.0.0.0 --port 8000\"]"; exit 2; }
	$(BIN)/crackclf serve --model $(MODEL) $(ARGS)

bench-serve: $(STAMP) ## load test of serve (2,000 requests, 8 concurrent, 127.0.0.1): make bench-serve MODEL=<model>
	@test -n "$(MODEL)" || { echo "usage: make bench-serve MODEL=<model> [ARGS=\"--concurrency 1\"]"; exit 2; }
	$(BIN)/python scripts/bench_serve.py --model $(MODEL) --data $(or $(DATA),$(SHARED_DATA)) \
		--out bench/bench_serve.json $(ARGS)

bench-transfer: $(STAMP) ## per-surface balanced accuracy / AUROC / recall of MODEL on other surfaces [SURFACES=dirs] [SPLIT=csv]
	@test -n "$(MODEL)" || { echo "usage: make bench-transfer MODEL=<model> [SURFACES=\"dir ...\"] [SPLIT=<the run's split csv>]"; exit 2; }
	$(BIN)/python scripts/bench_transfer.py --model $(MODEL) \
		--surfaces $(or $(SURFACES),$(wildcard $(SHARED_DATA)/../other_surfaces/*/)) \
		$(if $(SPLIT),--split $(SPLIT) --data $(or $(DATA),$(SHARED_DATA))) --out bench/transfer.json $(ARGS)

bench-adapt: $(STAMP) ## the adaptation curve of MODEL (0/10/25/50 labelled tiles per class) on other_surfaces [SURFACES=dirs] [REPLAY=dir]
	@test -n "$(MODEL)" || { echo "usage: make bench-adapt MODEL=<model> [SURFACES=\"dir ...\"] [REPLAY=<original data>]"; exit 2; }
	$(BIN)/python scripts/bench_adapt.py --model $(MODEL) \
		--surfaces $(or $(SURFACES),$(wildcard $(SHARED_DATA)/../other_surfaces/*/)) \
		--replay $(abspath $(or $(REPLAY),$(SHARED_DATA))) --out bench/adapt.json $(ARGS)

bench-shift: $(STAMP) ## test split re-rendered as other cameras/files would give it: make bench-shift MODEL=... SPLIT=<run's split csv>
	@test -n "$(MODEL)" -a -n "$(SPLIT)" || { echo "usage: make bench-shift MODEL=<model> SPLIT=<the run's data/split-*.csv> [DATA=...]"; exit 2; }
	$(BIN)/python scripts/bench_shift.py --model $(MODEL) --split $(SPLIT) --data $(or $(DATA),$(SHARED_DATA)) \
		--out bench/bench_shift.json $(ARGS)

# The browser test (tests/e2e) drives Debian's chromium + chromedriver; installed here when missing and root.
browser: ## install headless Chromium + chromedriver for the browser test (apt-get, as root) [BROWSER_REQUIRED=1: fail if not]
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium + chromium-driver for the browser test (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null; } || { echo "could not install chromium: the browser test will be skipped"; \
	      [ -z "$(BROWSER_REQUIRED)" ] || exit 1; }; \
	  else echo "no chromium/chromedriver and no root apt-get: the browser test will be skipped"; \
	    [ -z "$(BROWSER_REQUIRED)" ] || exit 1; fi; }

# Two pytest workers (pytest-xdist): one test process alone keeps ~1 of 2 cores busy (much of a test is a subprocess
# starting, a server waiting, a file written), two fill both. TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

test: $(STAMP) browser ## fast tests (slow ones excluded) [TEST_WORKERS=2]
	$(PYTEST) -m "not slow"

test-all: $(STAMP) browser ## every test, slow ones included, in one run [TEST_WORKERS=2]
	$(PYTEST)

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
