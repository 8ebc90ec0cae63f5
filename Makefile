# charlstm: `make train` and `make test` do all the set-up on a fresh machine (they bootstrap .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Installed first, and only when the environment has no torch yet, so a CUDA build already there is kept.
# CPU-only elsewhere: make install TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train generate eval test lint format docs tensorboard sweep search bench lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  extra arguments: make train ARGS='model.units=128 trainer.max_epochs=3'"

# The versions every other package is tested with are pinned in requirements.lock (make lock writes it).
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -r requirements.lock -e ".[dev]"
	@touch $@

install: $(VENV)/.installed ## create .venv and install charlstm with its dev tools

train: install ## train the default model on Macbeth (CPU, about 10 minutes)
	$(PY) train.py $(ARGS)

generate: install ## generate text from the newest run's last.ckpt
	$(PY) generate.py ckpt=last $(ARGS)

eval: install ## bits/char of the newest run's last.ckpt on its validation text (ARGS='data=file data.path=X')
	$(PY) eval.py ckpt=last $(ARGS)

test: install ## run the test suite (one worker per core; make test ARGS='-n 0 -k resume' for one process)
	$(PY) -m pytest -q -n auto $(ARGS)

lint: install ## ruff lint and format check, and the import contract between the layers (lint-imports)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: install ## ruff fix and format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

docs: install ## write docs/configuration.md, every config key with its default, rule and meaning, from configs/
	$(PY) docs/make_config_reference.py

tensorboard: install ## TensorBoard over every run and sweep job under outputs/
	$(BIN)/tensorboard --logdir outputs

sweep: install ## a sweep: units x seq_len (4 default runs); job folders and summary.md under outputs/multirun/
	$(PY) train.py -m model.units=64,128 data.seq_len=50,100 $(ARGS)

search: install ## an Optuna search (hparams_search=lstm) in outputs/search/lstm/; run it again to continue the study
	$(PY) train.py -m hparams_search=lstm $(ARGS)

bench: install ## the README's performance and quality tables (see benchmarks/)
	$(PY) benchmarks/train_bench.py $(ARGS)
	$(PY) benchmarks/bf16_bench.py
	$(PY) benchmarks/startup_bench.py
	$(PY) benchmarks/memory_bench.py
	$(PY) benchmarks/generate_speed.py

lock: install ## pin every dependency but torch (resolved against $(TORCH)) in requirements.lock, with pip-tools
	$(PIP) install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile -q --extra dev --unsafe-package torch --strip-extras \
		--no-emit-index-url --no-emit-find-links --constraint <(echo "$(TORCH)") -o requirements.lock pyproject.toml

clean: ## remove runs, cached corpora and caches (keeps .venv)
	rm -rf outputs/2* outputs/multirun outputs/search data/*.txt data/downloads data/prepared .pytest_cache .ruff_cache
