// Torch-free CPU kernels for RBM Gibbs sampling: the one pass over a GEMM output that
// adds the bias, applies the unit's mean function, draws the sample from Philox and
// accumulates the column sums CD needs. Raw pointers, OpenMP over rows, inner loops
// written so that GCC vectorises them (no branches, no calls into libm for float).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"
#include "unit_pass.h"

namespace aecore {
namespace cpu {

// exp for float with ~2 ulp error, branch-free so that a loop over it vectorises
// (glibc's expf is a scalar call per element and would dominate the pass). Cephes
// range reduction and polynomial; inputs are clamped to the finite range.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline int num_threads_for(int64_t work) {
#ifdef _OPENMP
  // Below ~32k elements a parallel region costs more than it saves.
  return work < 32768 ? 1 : omp_get_max_threads();
#else
  (void)work;
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Rows [r0, r1) of `rows` split evenly over `nt` threads.
inline void row_range(int64_t rows, int nt, int tid, int64_t& r0, int64_t& r1) {
  const int64_t chunk = (rows + nt - 1) / nt;
  r0 = std::min<int64_t>(rows, tid * chunk);
  r1 = std::min<int64_t>(rows, r0 + chunk);
}

namespace detail {

constexpr int64_t kChunk = 256;  // columns per Philox batch (multiple of 4)

// Philox words for columns [c0, c0 + n) of `row`; c0 is a multiple of 4.
inline void philox_words(uint32_t* out, int64_t row, int64_t c0, int64_t n, uint32_t k0,
                         uint32_t k1, uint32_t stream, uint32_t offset) {
  const int64_t g0 = c0 / 4;
  const int64_t ng = (n + 3) / 4;
  for (int64_t g = 0; g < ng; ++g) {
    const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(g0 + g), static_cast<uint32_t>(row),
                                       stream, offset, k0, k1);
    out[4 * g + 0] = r.v[0];
    out[4 * g + 1] = r.v[1];
    out[4 * g + 2] = r.v[2];
    out[4 * g + 3] = r.v[3];
  }
}

template <typename T>
void pass_rows(const UnitPass<T>& a, int64_t r0, int64_t r1, double* acc_mean, double* acc_state,
               double* acc_data, double& sq) {
  const int64_t C = a.cols;
  uint32_t k0 = 0, k1 = 0, offset = 0;
  if (a.sample && !a.noise) {
    seed_to_key(static_cast<uint64_t>(a.rng[0]), k0, k1);
    offset = static_cast<uint32_t>(a.rng[1]);
  }
  alignas(64) uint32_t words[kChunk];
  alignas(64) T normals[kChunk];
  for (int64_t i = r0; i < r1; ++i) {
    T* __restrict__ x = a.x + i * C;
    const T* __restrict__ b = a.bias;
    // 1) bias + mean function, in place (vectorised).
    if (a.unit == Unit::Bernoulli) {
      for (int64_t j = 0; j < C; ++j) x[j] = sigmoid(x[j] + b[j]);
    } else {
      for (int64_t j = 0; j < C; ++j) x[j] = x[j] + b[j];
    }
    if (acc_mean)
      for (int64_t j = 0; j < C; ++j) acc_mean[j] += static_cast<double>(x[j]);
    if (a.data) {
      const T* __restrict__ d = a.data + i * C;
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const double e = static_cast<double>(d[j]) - static_cast<double>(x[j]);
        s += e * e;
        acc_data[j] += static_cast<double>(d[j]);
      }
      sq += s;
    }
    // 2) the state: sample or mean, chunk by chunk so Philox words stay in L1.
    if (!a.state) continue;
    T* __restrict__ st = a.state + i * C;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      if (!a.sample) {
        for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j];
      } else if (a.unit == Unit::Bernoulli) {
        if (a.noise) {
          const T* __restrict__ u = a.noise + i * C + c0;
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = u[j] < x[c0 + j] ? T(1) : T(0);
        } else {
          philox_words(words, i, c0, n, k0, k1, a.stream, offset);
          for (int64_t j = 0; j < n; ++j)
            st[c0 + j] = uniform01<T>(words[j]) < x[c0 + j] ? T(1) : T(0);
        }
      } else {
        if (a.noise) {
          const T* __restrict__ z = a.noise + i * C + c0;
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j] + z[j];
        } else {
          philox_words(words, i, c0, n, k0, k1, a.stream, offset);
          for (int64_t j = 0; j < n; j += 2)  // words are filled to a multiple of 4
            box_muller<T>(words[j], words[j + 1], normals[j], normals[j + 1]);
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j] + normals[j];
        }
      }
    }
    if (acc_state)
      for (int64_t j = 0; j < C; ++j) acc_state[j] += static_cast<double>(st[j]);
  }
}

}  // namespace detail

// Runs the pass over all rows with OpenMP. Each thread owns a block of rows and private
// accumulators, reduced in thread order afterwards, so for a given thread count the sums
// are deterministic; the samples never depend on the thread count (Philox counters are
// per element).
template <typename T>
void unit_pass(const UnitPass<T>& a) {
  const int64_t C = a.cols;
  if (a.rows == 0 || C == 0) return;
  const int nt = num_threads_for(a.rows * C);
  const int n_acc = 3;
  std::vector<double> acc(static_cast<size_t>(nt) * n_acc * C, 0.0);
  std::vector<double> sq(static_cast<size_t>(nt), 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = nt > 1 ? thread_id() : 0;
    int64_t r0, r1;
    row_range(a.rows, nt, tid, r0, r1);
    double* base = acc.data() + static_cast<size_t>(tid) * n_acc * C;
    detail::pass_rows(a, r0, r1, a.colsum_mean ? base : nullptr,
                      a.colsum_state ? base + C : nullptr, a.data ? base + 2 * C : nullptr,
                      sq[tid]);
  }
  for (int t = 0; t < nt; ++t) {
    const double* base = acc.data() + static_cast<size_t>(t) * n_acc * C;
    if (a.colsum_mean)
      for (int64_t j = 0; j < C; ++j) a.colsum_mean[j] += base[j];
    if (a.colsum_state)
      for (int64_t j = 0; j < C; ++j) a.colsum_state[j] += base[C + j];
    if (a.colsum_data)
      for (int64_t j = 0; j < C; ++j) a.colsum_data[j] += base[2 * C + j];
    if (a.sq_err) *a.sq_err += sq[t];
  }
}

// out[j] += sum_i x[i, j] for a (rows, cols) row-major matrix (double accumulation).
template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, double* out) {
  if (rows == 0 || cols == 0) return;
  const int nt = num_threads_for(rows * cols);
  std::vector<double> acc(static_cast<size_t>(nt) * cols, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = nt > 1 ? thread_id() : 0;
    int64_t r0, r1;
    row_range(rows, nt, tid, r0, r1);
    double* __restrict__ s = acc.data() + static_cast<size_t>(tid) * cols;
    for (int64_t i = r0; i < r1; ++i) {
      const T* __restrict__ xi = x + i * cols;
      for (int64_t j = 0; j < cols; ++j) s[j] += static_cast<double>(xi[j]);
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < cols; ++j) out[j] += acc[static_cast<size_t>(t) * cols + j];
}

}  // namespace cpu
}  // namespace aecore
