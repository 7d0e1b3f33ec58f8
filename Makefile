# meshfed: `make demo` (set-up + main job) and `make test` (set-up + whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LOCK_FLAGS ?= --upgrade

.PHONY: venv lock system demo test unit lint bench clean

venv: $(STAMP)

# Installs exactly what requirements.lock pins, every file checked against its hash; meshfed itself
# is installed editable on top, built with the locked setuptools (no unpinned build isolation).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh the lock after editing pyproject.toml (or to take new releases): review the diff, commit it.
lock:
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(BIN)/uv pip compile pyproject.toml scripts/lock-build.in --extra dev --generate-hashes \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--custom-compile-command "make lock" -o $(LOCK) $(LOCK_FLAGS)

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
