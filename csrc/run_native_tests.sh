#!/usr/bin/env bash
# Native checks of aecore's kernels, run by `make test`:
#   1. cmake present: configure + build the torch-free kernels and their C++ unit tests
#      in build/native, then run them with ctest;
#   2. nvcc present: compile-check every CUDA file (csrc/**/*.cu) with `nvcc -c`; they
#      include no torch headers, so this works without CUDA torch and without a GPU;
#   3. AECORE_CHECK_CUDA_BINDING=1 (opt-in): syntax-check the CUDA torch binding
#      csrc/cuda/ops_cuda.cpp against the installed torch headers.
# Each step says when it is skipped. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if command -v cmake >/dev/null 2>&1; then
  generator=()
  if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
  elif [ -x .venv/bin/ninja ]; then
    generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja")
  fi
  cmake -S . -B build/native "${generator[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/native
  ctest --test-dir build/native --output-on-failure
else
  echo "native kernel tests: skipped: cmake not found"
fi

if command -v nvcc >/dev/null 2>&1; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  for cu in $(find csrc -name '*.cu' | sort); do
    echo "nvcc -c $cu"
    nvcc -std=c++20 -O3 -arch=sm_90 -Icsrc -c "$cu" -o "$out/$(basename "$cu").o"
  done
  echo "CUDA kernels: compile check passed"
else
  echo "CUDA kernels: skipped: nvcc not found"
fi

if [ "${AECORE_CHECK_CUDA_BINDING:-0}" = "1" ]; then
  if ! command -v nvcc >/dev/null 2>&1; then
    echo "CUDA binding: skipped: nvcc not found"
    exit 0
  fi
  # the toolkit's headers: CUDA_HOME, else next to the nvcc on PATH
  cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
  [ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda
  cuda_inc="$cuda_home/include"
  includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
  py_inc=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  # CPU builds of torch ship c10/cuda headers without this generated one.
  stub=build/native/stub/c10/cuda/impl
  mkdir -p "$stub"
  [ -f "$stub/cuda_cmake_macros.h" ] || echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$stub/cuda_cmake_macros.h"
  # shellcheck disable=SC2086
  ${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Icsrc $includes -Ibuild/native/stub -I"$py_inc" \
    -I"$cuda_inc" csrc/cuda/ops_cuda.cpp
  echo "CUDA binding: syntax check passed"
fi
