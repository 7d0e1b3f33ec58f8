# meshfed: `make demo` (set-up + main job) and `make test` (set-up + whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system demo test unit lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

system:
	bash scripts/setup-system.sh

demo: venv system
	$(BIN)/meshfed demo

lint: venv
	$(BIN)/ruff check gitops federation ztunnel clusters chaos tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: venv system lint
	$(BIN)/python -m pytest -q

unit: venv
	$(BIN)/python -m pytest -q tests/unit

bench: venv system
	$(BIN)/python -m benchmarks.graph

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
