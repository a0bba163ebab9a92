// Torch-free CPU kernels of the momentum update that models with their own update rule
// (the RBM) apply after each step: a finiteness check of the step, then one pass per
// parameter instead of the three multi-tensor ops (and the reduction) it replaces.
#pragma once

#include <cstdint>

#include "cpu/rbm_cpu.h"

namespace aecore {
namespace cpu {

// Whether every x[i] is finite: x - x is 0 for a finite x and NaN otherwise (an int
// count of the NaNs, so that the loop vectorises).
template <typename T>
bool all_finite(const T* __restrict__ x, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T d = x[i] - x[i];
    bad += d != d;
  }
  return bad == 0;
}

// v = momentum * v + lr * (s - weight_decay * p); p += v.
template <typename T>
void momentum_update(T* __restrict__ p, T* __restrict__ v, const T* __restrict__ s, int64_t n,
                     T lr, T momentum, T weight_decay) {
  const int nt = threads_now(n);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T vi = momentum * v[i] + lr * (s[i] - weight_decay * p[i]);
    v[i] = vi;
    p[i] += vi;
  }
}

}  // namespace cpu
}  // namespace aecore
