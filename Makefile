# Every target bootstraps .venv on first use, so a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 2 cores: keep torch from oversubscribing when pytest runs.
export OMP_NUM_THREADS ?= 2

.PHONY: demo test test-all lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mtl run --config configs/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Also the `slow` tests: real processes competing for a run folder, the concurrency soak (CI runs this).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

# The reference pages are generated from the code first, so the site never shows stale flags or keys.
docs: $(STAMP)
	$(BIN)/python -m metatransfer.docgen
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
