# One entry point for people and CI.  `make demo` and `make test` work on a fresh
# machine with Python 3.11+, a Rust toolchain and make; `make check` is what CI runs.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test check lint fmt rust-test stubtest bench setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The kernel (Rust core built in release mode) and the built-in plugins.
setup: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet -e plugins
	$(BIN)/pip install --quiet -e plugins/pysigma-backend-vmkernel --config-settings editable_mode=compat

# Plus the test and lint tools and the example third-party plugin.
setup-dev: setup
	$(BIN)/pip install --quiet -e ".[dev,test]"
	$(BIN)/pip install --quiet -e examples/vmk-example-quota

demo: setup
	$(BIN)/vmkernel demo

test: setup-dev
	$(BIN)/pytest

rust-test:
	cargo test --workspace
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all -- --check

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

stubtest: setup-dev
	$(BIN)/python -m mypy.stubtest vmkernel._core

check: test rust-test lint stubtest

fmt: setup-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	cargo fmt --all

bench: setup-dev
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) target vmkernel/_core*.so
