// Torch-free CPU kernels of adam_step_: the gradients' sum of squares (their finiteness
// and the clipping norm in one read) and Adam's update, one pass per parameter. At the
// sizes of small models the optimizer's per-tensor dispatches, not its arithmetic, are
// most of a step; here the whole step is one call.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/rbm_cpu.h"

namespace aecore {
namespace cpu {

// Adam's coefficients for one parameter at its step t, each computed in double by the
// caller and rounded once, as torch.optim computes its scalars: weight1 = 1 - beta1 (the
// first moment's lerp weight), weight2 = 1 - beta2, step_size = lr / (1 - beta1^t),
// bc2_sqrt = sqrt(1 - beta2^t); decay: the parameter's factor 1 - lr * weight_decay when
// decoupled (AdamW), else the L2 term's weight_decay; none where weight_decay is 0.
template <typename T>
struct AdamCoefs {
  T weight1, beta2, weight2, eps, step_size, bc2_sqrt, grad_scale, decay;
  bool decoupled, has_decay;
};

namespace detail {

// Elements per block of the sum of squares: each block is summed alone and the blocks in
// order, so the result does not depend on how many threads shared them.
constexpr int64_t kSquaresBlock = int64_t(1) << 16;

// Lanes of independent partial sums: one running sum is a chain of dependent additions
// that cannot vectorise (floating-point addition does not reassociate), lanes can.
constexpr int kSquaresLanes = 16;

template <typename T>
__attribute__((always_inline)) inline double sum_squares_impl(const T* __restrict__ x,
                                                              int64_t n) {
  double lanes[kSquaresLanes] = {};
  int64_t i = 0;
  for (; i + kSquaresLanes <= n; i += kSquaresLanes) {
    for (int j = 0; j < kSquaresLanes; ++j) {
      const double d = static_cast<double>(x[i + j]);
      lanes[j] += d * d;
    }
  }
  double s = 0.0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i]);
    s += d * d;
  }
  for (int j = 0; j < kSquaresLanes; ++j) s += lanes[j];
  return s;
}
AECORE_CLONES static double sum_squares_block(const float* x, int64_t n) {
  return sum_squares_impl<float>(x, n);
}
AECORE_CLONES static double sum_squares_block(const double* x, int64_t n) {
  return sum_squares_impl<double>(x, n);
}

template <typename T>
__attribute__((always_inline)) inline void adam_rows_impl(T* __restrict__ p, T* __restrict__ m,
                                                          T* __restrict__ v,
                                                          const T* __restrict__ g, int64_t n,
                                                          const AdamCoefs<T> c) {
  // torch's lerp: from the nearer end, so that a weight of 1 (beta1 = 0) gives g exactly
  const bool from_g = c.weight1 >= T(0.5);
  const T rest1 = T(1) - c.weight1;
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i] * c.grad_scale;
    T pi = p[i];
    if (c.has_decay) {  // (0 * an infinite parameter would be NaN: torch adds no term)
      if (c.decoupled) {
        pi *= c.decay;
      } else {
        gi += c.decay * pi;
      }
    }
    const T mi = from_g ? gi - (gi - m[i]) * rest1 : m[i] + c.weight1 * (gi - m[i]);
    const T vi = c.beta2 * v[i] + c.weight2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - c.step_size * (mi / (std::sqrt(vi) / c.bc2_sqrt + c.eps));
  }
}
AECORE_CLONES static void adam_rows(float* p, float* m, float* v, const float* g, int64_t n,
                                    const AdamCoefs<float> c) {
  adam_rows_impl<float>(p, m, v, g, n, c);
}
AECORE_CLONES static void adam_rows(double* p, double* m, double* v, const double* g, int64_t n,
                                    const AdamCoefs<double> c) {
  adam_rows_impl<double>(p, m, v, g, n, c);
}

}  // namespace detail

// Sum of x[i]^2 over x[0, n), accumulated in double in a fixed order of blocks.
template <typename T>
double sum_squares(const T* x, int64_t n) {
  using detail::kSquaresBlock;
  const int64_t blocks = (n + kSquaresBlock - 1) / kSquaresBlock;
  const int nt = std::min<int64_t>(threads_now(n), blocks);
  if (nt <= 1) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kSquaresBlock;
      s += detail::sum_squares_block(x + i0, std::min(kSquaresBlock, n - i0));
    }
    return s;
  }
  std::vector<double> partial(blocks);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kSquaresBlock;
    partial[b] = detail::sum_squares_block(x + i0, std::min(kSquaresBlock, n - i0));
  }
  double s = 0.0;
  for (const double part : partial) s += part;
  return s;
}

// Adam's update of one parameter p with its moments m, v and gradient g, in place.
template <typename T>
void adam_update(T* p, T* m, T* v, const T* g, int64_t n, const AdamCoefs<T>& c) {
  const int nt = threads_now(n);
  if (nt <= 1) {
    detail::adam_rows(p, m, v, g, n, c);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t i0, i1;
    row_range(n, nt, thread_id(), i0, i1);
    detail::adam_rows(p + i0, m + i0, v + i0, g + i0, i1 - i0, c);
  }
}

}  // namespace cpu
}  // namespace aecore
