# The two commands a fresh machine needs: `make smoke` and `make test`.
# Both bootstrap .venv on first use (CPU wheels; torch pinned to its CPU build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: smoke test lint format venv clean bench

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,torch]'
	touch $(STAMP)

venv: $(STAMP)

smoke: $(STAMP)
	rm -rf runs/smoke
	$(BIN)/python -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/smoke
	$(BIN)/python -m deepseek_jax.generate --checkpoint=runs/smoke --prompt="def " \
	    --max-new-tokens=200 --temperature=0.8 --top-p=0.95 --seed=0 --speculative=mtp

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ruff (lint + format check, 100 columns; configured in pyproject.toml), installed with the rest.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs/smoke .pytest_cache
