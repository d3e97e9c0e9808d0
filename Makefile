# samstudy: every target creates the virtual environment first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NAME   ?= quickstart
ARGS   ?=

.PHONY: setup test test-fast lint docs bench study plan ui export report train clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check samstudy tests benchmarks

docs: $(STAMP)
	$(PY) -m samstudy.optim README.md docs/optimizers.md

# ARGS="--only gpu": the GPU bench alone (benchmarks/bench_gpu.py; CUDA only)
bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

study: $(STAMP)
	$(PY) -m samstudy study $(NAME) $(ARGS)

plan: $(STAMP)
	$(PY) -m samstudy plan $(NAME) $(ARGS)

export: $(STAMP)
	$(PY) -m samstudy export $(NAME) $(ARGS)

report: $(STAMP)
	$(PY) -m samstudy report $(NAME) $(ARGS)

ui: $(STAMP)
	$(PY) -m samstudy ui $(ARGS)

train: $(STAMP)
	$(PY) -m samstudy train $(ARGS)
