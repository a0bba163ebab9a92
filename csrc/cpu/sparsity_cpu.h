// Torch-free CPU kernels for the KL sparsity penalty (forward: one read of h; backward:
// one write of the gradient). Top-k sparsification is in topk_cpu.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/rbm_cpu.h"
#include "common/sparsity_common.h"

namespace aecore {
namespace cpu {

// log for float, ~1 ulp, branch-free so that a loop over it vectorises (glibc's scalar
// log calls would cost more than the pass over h at typical sizes). Cephes logf: split
// x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then a degree-9 polynomial in m - 1.
// Valid for positive normal x (the clamped rho-hat always is).
inline float log_approx(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

namespace detail {
// sum_j KL(rho || clamp(q_j)). float: vectorised float logs (relative error ~1e-7, below
// float32 output precision); double: libm logs.
// The float KL terms; compiled for AVX-512 / AVX2 too (target_clones), ~4x the baseline
// SSE2 loop, which was a third of the forward at 256x1024.
AECORE_CLONES static void kl_terms(const double* __restrict__ q, int64_t cols, float r, float r1,
                                   float lr, float lr1, float* __restrict__ t) {
  const float lo = static_cast<float>(kKlEps), hi = static_cast<float>(1.0 - kKlEps);
  for (int64_t j = 0; j < cols; ++j) {
    float qc = static_cast<float>(q[j]);
    qc = qc < lo ? lo : qc;
    qc = qc > hi ? hi : qc;
    // 1 - q from the double value: 1 - float(q) would lose KL_EPS-sized differences
    float om = static_cast<float>(1.0 - q[j]);
    om = om < lo ? lo : om;
    om = om > hi ? hi : om;
    t[j] = r * (lr - log_approx(qc)) + r1 * (lr1 - log_approx(om));
  }
}
inline double kl_sum(const double* q, int64_t cols, double rho, double);
inline double kl_sum(const double* q, int64_t cols, double rho, float) {
  const float r = static_cast<float>(rho), r1 = static_cast<float>(1.0 - rho);
  // a rho that rounds to 0 or 1 in float would give 0 * log(0); and log_approx would
  // turn a NaN mean into a number: both take the double terms
  int nan = 0;  // an int sum (not a bool or) so that the loop vectorises
  for (int64_t j = 0; j < cols; ++j) nan += q[j] != q[j];
  if (r == 0.0f || r1 == 0.0f || nan) return kl_sum(q, cols, rho, 0.0);
  const float lr = std::log(r), lr1 = std::log(r1);
  // vectorised: the terms go to a buffer (a double-sum reduction would not vectorise)
  std::vector<float> terms(static_cast<size_t>(cols));
  kl_terms(q, cols, r, r1, lr, lr1, terms.data());
  double s = 0.0;
  for (int64_t j = 0; j < cols; ++j) s += static_cast<double>(terms[j]);
  return s;
}
inline double kl_sum(const double* q, int64_t cols, double rho, double) {
  double s = 0.0;
  for (int64_t j = 0; j < cols; ++j) s += aecore::kl_term(rho, q[j]);
  return s;
}
}  // namespace detail

// Forward: mean[j] = mean_i h[i,j]; returns beta * sum_j KL(rho || mean[j]).
template <typename T>
double kl_sparsity_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta,
                           T* mean) {
  std::vector<double> q(static_cast<size_t>(cols), 0.0);
  column_sums(h, rows, cols, q.data());
  for (int64_t j = 0; j < cols; ++j) {
    q[j] /= static_cast<double>(rows);
    mean[j] = static_cast<T>(q[j]);
  }
  return beta * detail::kl_sum(q.data(), cols, rho, T(0));
}

// Backward: d loss / d h[i,j] is the same for every row i, so the op returns that one
// row (cols values, O(cols) work) and the caller broadcasts it as torch's sum does: a
// (rows, cols) gradient would be a full write whose every row is equal.
// grad_mean (nullable) is the incoming gradient of the `mean` output.
template <typename T>
void kl_sparsity_backward(T grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                          int64_t cols, double rho, double beta, T* grad_row) {
  if (rows == 0) return;
  const double inv_b = 1.0 / static_cast<double>(rows);
  for (int64_t j = 0; j < cols; ++j) {
    double c = static_cast<double>(grad_loss) * beta * aecore::kl_dterm(rho, static_cast<double>(mean[j]));
    if (grad_mean) c += static_cast<double>(grad_mean[j]);
    grad_row[j] = static_cast<T>(c * inv_b);
  }
}

}  // namespace cpu
}  // namespace aecore
