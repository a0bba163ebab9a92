# Two commands matter: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aecore-installed

.PHONY: install demo test lint format clean

install: $(STAMP)

# Reinstall when the pinned environment, the build or the kernels change; Python
# sources are an editable install and need nothing.
$(STAMP): requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $(STAMP)

demo: install
	$(BIN)/aecore demo --out runs/demo

# native: the torch-free kernels' C++ tests (ctest) and an nvcc compile check of the
# CUDA kernels, each skipped with a message where cmake / nvcc is missing
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	csrc/run_native_tests.sh
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build *.egg-info runs .pytest_cache
