# samstudy: every target creates the virtual environment first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NAME   ?= quickstart
ARGS   ?=

.PHONY: setup test test-fast lint docs bench study plan smoke status stop ui export summarize report train clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Two pytest-xdist workers, whole modules each (module fixtures built once), longest modules first
# (tests/conftest.py); TEST_WORKERS=0: one process, as plain `pytest` runs
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check samstudy tests benchmarks
	$(PY) -m ruff format --check samstudy tests benchmarks

docs: $(STAMP)
	$(PY) -m samstudy.optim README.md docs/optimizers.md

# ARGS="--only gpu": the GPU bench alone (benchmarks/bench_gpu.py; CUDA only)
bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

study: $(STAMP)
	$(PY) -m samstudy study $(NAME) $(ARGS)

plan: $(STAMP)
	$(PY) -m samstudy plan $(NAME) $(ARGS)

smoke: $(STAMP)
	$(PY) -m samstudy smoke $(NAME) $(ARGS)

status: $(STAMP)
	$(PY) -m samstudy status $(NAME) $(ARGS)

stop: $(STAMP)
	$(PY) -m samstudy stop $(NAME) $(ARGS)

export: $(STAMP)
	$(PY) -m samstudy export $(NAME) $(ARGS)

# export, then one MLflow run per variant (tag samstudy.role=variant) for the MLflow UI
summarize: $(STAMP)
	$(PY) -m samstudy summarize $(NAME) $(ARGS)

report: $(STAMP)
	$(PY) -m samstudy report $(NAME) $(ARGS)

ui: $(STAMP)
	$(PY) -m samstudy ui $(ARGS)

train: $(STAMP)
	$(PY) -m samstudy train $(ARGS)
