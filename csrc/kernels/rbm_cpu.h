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
// range reduction and polynomial; inputs are clamped to the finite range. Needs
// -fno-trapping-math to vectorise (the selects must not be kept as branches).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const float nf = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const int n = static_cast<int>(nf);
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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AECORE_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), unused))
#else
#define AECORE_CLONES __attribute__((unused))
#endif


constexpr int64_t kChunk = 256;  // columns per Philox batch (multiple of 4)

// Philox words for columns [c0, c0 + n) of `row` (c0 a multiple of 4, n <= kChunk):
// out[4g + l] = lane l of philox(ctr = {c0/4 + g, row, stream, offset}). The counters are
// kept as four arrays (structure of arrays) and the rounds run across all groups at once,
// so the 32x32->64 multiplies vectorise; target_clones adds AVX2 / AVX-512 versions
// picked at load time, the default build stays baseline x86-64.
AECORE_CLONES static void philox_words(uint32_t* out, int64_t row, int64_t c0, int64_t n, uint32_t k0,
                         uint32_t k1, uint32_t stream, uint32_t offset) {
  constexpr int L = kChunk / 4;
  alignas(64) uint32_t x0[L], x1[L], x2[L], x3[L];
  const uint32_t g0 = static_cast<uint32_t>(c0 / 4);
  for (int g = 0; g < L; ++g) {
    x0[g] = g0 + static_cast<uint32_t>(g);
    x1[g] = static_cast<uint32_t>(row);
    x2[g] = stream;
    x3[g] = offset;
  }
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      ka += philox_detail::kW0;
      kb += philox_detail::kW1;
    }
    for (int g = 0; g < L; ++g) {
      const uint64_t p0 = static_cast<uint64_t>(philox_detail::kM0) * x0[g];
      const uint64_t p1 = static_cast<uint64_t>(philox_detail::kM1) * x2[g];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[g] ^ ka;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[g] ^ kb;
      x0[g] = n0;
      x1[g] = static_cast<uint32_t>(p1);
      x2[g] = n2;
      x3[g] = static_cast<uint32_t>(p0);
    }
  }
  const int64_t ng = (n + 3) / 4;
  for (int64_t g = 0; g < ng; ++g) {
    out[4 * g + 0] = x0[g];
    out[4 * g + 1] = x1[g];
    out[4 * g + 2] = x2[g];
    out[4 * g + 3] = x3[g];
  }
}

template <typename T>
__attribute__((always_inline)) inline void pass_rows_impl(const UnitPass<T>& a, int64_t r0,
                                                          int64_t r1, double* acc_mean,
                                                          double* acc_state, double* acc_data,
                                                          double& sq) {
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

// Non-template entry points so that target_clones can compile the pass for AVX2 and
// AVX-512 too (picked at load time); the default clone is baseline x86-64.
AECORE_CLONES static void pass_rows(const UnitPass<float>& a, int64_t r0, int64_t r1,
                                    double* acc_mean, double* acc_state, double* acc_data,
                                    double& sq) {
  pass_rows_impl<float>(a, r0, r1, acc_mean, acc_state, acc_data, sq);
}
AECORE_CLONES static void pass_rows(const UnitPass<double>& a, int64_t r0, int64_t r1,
                                    double* acc_mean, double* acc_state, double* acc_data,
                                    double& sq) {
  pass_rows_impl<double>(a, r0, r1, acc_mean, acc_state, acc_data, sq);
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

namespace detail {

// Rows [r0, r1) summed into s (double): blocks of 32 rows are summed in T (full-width
// SIMD, no conversions; 32 terms keep float error ~1e-6 relative), then added to s.
template <typename T>
__attribute__((always_inline)) inline void column_sums_impl(const T* x, int64_t r0, int64_t r1,
                                                            int64_t cols, T* blk, double* s) {
  for (int64_t b0 = r0; b0 < r1; b0 += 32) {
    const int64_t b1 = std::min(r1, b0 + 32);
    T* __restrict__ bk = blk;
    for (int64_t j = 0; j < cols; ++j) bk[j] = T(0);
    for (int64_t i = b0; i < b1; ++i) {
      const T* __restrict__ xi = x + i * cols;
      for (int64_t j = 0; j < cols; ++j) bk[j] += xi[j];
    }
    double* __restrict__ sd = s;
    for (int64_t j = 0; j < cols; ++j) sd[j] += static_cast<double>(bk[j]);
  }
}
AECORE_CLONES static void column_sums_rows(const float* x, int64_t r0, int64_t r1, int64_t cols,
                                           float* blk, double* s) {
  column_sums_impl<float>(x, r0, r1, cols, blk, s);
}
AECORE_CLONES static void column_sums_rows(const double* x, int64_t r0, int64_t r1,
                                           int64_t cols, double* blk, double* s) {
  column_sums_impl<double>(x, r0, r1, cols, blk, s);
}

}  // namespace detail

// out[j] += sum_i x[i, j] for a (rows, cols) row-major matrix, accumulated in double.
template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, double* out) {
  if (rows == 0 || cols == 0) return;
  const int nt = num_threads_for(rows * cols);
  std::vector<double> acc(static_cast<size_t>(nt) * cols, 0.0);
  std::vector<T> blk(static_cast<size_t>(nt) * cols);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = nt > 1 ? thread_id() : 0;
    int64_t r0, r1;
    row_range(rows, nt, tid, r0, r1);
    detail::column_sums_rows(x, r0, r1, cols, blk.data() + static_cast<size_t>(tid) * cols,
                             acc.data() + static_cast<size_t>(tid) * cols);
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < cols; ++j) out[j] += acc[static_cast<size_t>(t) * cols + j];
}

}  // namespace cpu
}  // namespace aecore
