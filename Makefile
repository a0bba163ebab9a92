# Two commands matter: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aecore-installed

.PHONY: install demo test lint format clean cuda-check

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
# CUDA kernels, each skipped with a message where cmake / nvcc is missing. Tests run one
# torch thread each (tests/conftest.py), so one worker process per core uses the machine;
# loadscope keeps a module's shared fixtures in one worker.
TEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	csrc/run_native_tests.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The CUDA extension built and imported without a GPU: PyPI's CUDA build of torch goes into
# its own venv (pip --isolated skips this machine's pin of the CPU wheel; ~4.7 GB), then
# setup.py builds aecore._C_cuda against it with the toolkit nvcc belongs to. Not part of
# `make test`.
CUDA_VENV := .venv-cuda
CUDA_TORCH ?= torch==2.13.0
# the toolkit nvcc belongs to (nvcc may be a wrapper script outside it)
CUDA_HOME ?= $(shell h=$$(dirname "$$(dirname "$$(readlink -f "$$(command -v nvcc)")")"); \
  [ -f "$$h/include/cuda_runtime.h" ] || h=/usr/local/cuda; echo $$h)
cuda-check:
	@test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --isolated -q $(CUDA_TORCH) numpy setuptools ninja
	CUDA_HOME=$(CUDA_HOME) AECORE_CUDA=1 AECORE_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 $(CUDA_VENV)/bin/python setup.py -q build_ext \
	  --build-lib build/cuda-check --build-temp build/cuda-check-tmp
	cd build/cuda-check && ../../$(CUDA_VENV)/bin/python -c "import torch, aecore._C, \
	  aecore._C_cuda; from torch._C import _dispatch_get_all_op_names as names, \
	  _dispatch_has_kernel_for_dispatch_key as has; print('aecore._C_cuda loads against', \
	  'torch', torch.__version__, 'CUDA', torch.version.cuda); print('ops with CUDA kernels:', \
	  ', '.join(sorted(n for n in names() if n.startswith('aecore::') and has(n, 'CUDA'))))"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build *.egg-info runs .pytest_cache
