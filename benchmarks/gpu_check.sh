#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and its own torch, nvcc, ninja, pytest and
# hypothesis (no network): builds aecore's kernels against that torch, runs the CUDA op
# tests and the CUDA benchmarks. Run from the repository root; about 5 minutes on an H200,
# never more than GPU_CHECK_SECONDS (540).
# Results go to ${OUT:-gpu-check}/: one log of every stage, and the benchmarks' JSON.
# Wheels in .whl/ (sae-lens and what it needs that the machine lacks) are installed to a
# private folder for the SAE step benchmark's sae-lens column.
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
# nvcc's toolkit; where nvcc is a wrapper script (/usr/local/bin/nvcc), /usr/local/cuda
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=/usr/local/cuda
fi
export CUDA_HOME
status=0
log=$out/check.log
: >"$log"
# the whole check ends inside this many seconds (a device call is cut at 600 s, and a
# stage cut short still leaves its log): each stage's limit is capped by what is left
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
step() {  # step NAME SECONDS COMMAND...: one stage, its time limit; output to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$log"
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "   skipped: the check's time is spent" | tee -a "$log"
    status=1
    return 124
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/stage.log" 2>&1
  local rc=$?
  cat "$out/stage.log" >>"$log"
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
  tail -n 25 "$out/stage.log"
  rm -f "$out/stage.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# an editable install against the machine's torch (offline: no build isolation, no
# dependencies fetched), so the entry points that name the built-in models exist
# strict: a CUDA kernel that fails to compile fails the check (else the CUDA tests skip)
step build 200 env AECORE_CUDA=1 AECORE_STRICT_BUILD=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . || exit 1
# built and in use (an extension reported out of date would leave every CUDA test skipped)
step backend 30 "$PYTHON" -c "from aecore import ops; b = ops.backend('cd_update_', 'cuda'); \
print(b); assert b == 'fused cuda', ops.backend_report()" || exit 1
# -v: each test's name is in the log before it runs, so a crash names its test
step test_ops 150 "$PYTHON" -m pytest -v --tb=short -p no:cacheprovider tests/test_ops_cuda.py \
  tests/test_ops_sae.py
rc=$?
crashed=$(grep -o "^tests/[^ ]*::[^ ]*" "$log" | tail -n 1)
if [ $rc -ge 128 ] && [ $rc -ne 124 ] && [ -n "$crashed" ] && command -v cuda-gdb >/dev/null; then
  # a crash (signal): the native stack of the test that was running, then the rest
  step native_backtrace 120 cuda-gdb -batch -ex run -ex "bt 40" --args "$PYTHON" -m pytest -q \
    -p no:cacheprovider -p no:faulthandler "$crashed"
  step test_ops_after_crash 150 "$PYTHON" -m pytest -q --tb=short -p no:cacheprovider \
    tests/test_ops_cuda.py tests/test_ops_sae.py --deselect "$crashed"
fi
step bench_kernels 100 "$PYTHON" -m aecore bench kernels --device cuda --quick --profile \
  --json "$out/kernels.json"
if compgen -G ".whl/*.whl" >/dev/null; then
  step saelens_wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/saelens-site .whl/*.whl
  export PYTHONPATH=/tmp/saelens-site${PYTHONPATH:+:$PYTHONPATH}
fi
step bench_sae_step 120 "$PYTHON" -m aecore bench sae-step --device cuda --no-compile \
  --dtype bfloat16 --shapes small,large,4096:131072:128 --profile --json "$out/sae_step_bf16.json"
step bench_sae_step_f32 90 "$PYTHON" -m aecore bench sae-step --device cuda --no-compile \
  --shapes small,large --json "$out/sae_step_f32.json"
step bench_sae_step_auxk 90 "$PYTHON" -m aecore bench sae-step --device cuda --no-compile \
  --dtype bfloat16 --shapes 4096:131072:128 --dead-fraction 0.2 --json "$out/sae_step_auxk.json"
exit $status
