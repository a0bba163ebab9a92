// Torch-free CPU kernels of the momentum update that models with their own update rule
// (the RBM) apply after each step: a finiteness check of the step, then one pass per
// parameter instead of the three multi-tensor ops (and the reduction) it replaces.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/rbm_cpu.h"

namespace aecore {
namespace cpu {
namespace detail {

// NaNs or infinities in x[0, n): x - x is 0 for a finite x and NaN otherwise. An int32
// count per block of 2^20 (so that the compare-and-add loop vectorises at full width).
template <typename T>
__attribute__((always_inline)) inline int64_t count_non_finite_impl(const T* __restrict__ x,
                                                                    int64_t n) {
  int64_t bad = 0;
  for (int64_t b0 = 0; b0 < n; b0 += int64_t(1) << 20) {
    const int64_t b1 = std::min(n, b0 + (int64_t(1) << 20));
    int32_t block = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const T d = x[i] - x[i];
      block += d != d;
    }
    bad += block;
  }
  return bad;
}
AECORE_CLONES static int64_t count_non_finite(const float* x, int64_t n) {
  return count_non_finite_impl<float>(x, n);
}
AECORE_CLONES static int64_t count_non_finite(const double* x, int64_t n) {
  return count_non_finite_impl<double>(x, n);
}

template <typename T>
__attribute__((always_inline)) inline void momentum_rows_impl(T* __restrict__ p, T* __restrict__ v,
                                                              const T* __restrict__ s, int64_t n,
                                                              T lr, T momentum, T weight_decay) {
  for (int64_t i = 0; i < n; ++i) {
    const T vi = momentum * v[i] + lr * (s[i] - weight_decay * p[i]);
    v[i] = vi;
    p[i] += vi;
  }
}
AECORE_CLONES static void momentum_rows(float* p, float* v, const float* s, int64_t n, float lr,
                                        float momentum, float weight_decay) {
  momentum_rows_impl<float>(p, v, s, n, lr, momentum, weight_decay);
}
AECORE_CLONES static void momentum_rows(double* p, double* v, const double* s, int64_t n,
                                        double lr, double momentum, double weight_decay) {
  momentum_rows_impl<double>(p, v, s, n, lr, momentum, weight_decay);
}

}  // namespace detail

// Whether every x[i] is finite.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  return detail::count_non_finite(x, n) == 0;
}

// v = momentum * v + lr * (s - weight_decay * p); p += v.
template <typename T>
void momentum_update(T* p, T* v, const T* s, int64_t n, T lr, T momentum, T weight_decay) {
  const int nt = threads_now(n);
  if (nt <= 1) {
    detail::momentum_rows(p, v, s, n, lr, momentum, weight_decay);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t i0, i1;
    row_range(n, nt, thread_id(), i0, i1);
    detail::momentum_rows(p + i0, v + i0, s + i0, i1 - i0, lr, momentum, weight_decay);
  }
}

}  // namespace cpu
}  // namespace aecore
