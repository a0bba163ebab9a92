// Torch-free CPU kernels for the sparsity penalties: the KL sparsity penalty (forward:
// one read of h; backward: one write of the gradient) and top-k sparsification.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
inline double kl_sum(const double* q, int64_t cols, double rho, float) {
  const float r = static_cast<float>(rho), r1 = static_cast<float>(1.0 - rho);
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

namespace detail {

// Per-thread buffers of the filtered top-k.
template <typename T>
struct TopkScratch {
  std::vector<T> gmax, cand_val;
  std::vector<int64_t> cand_idx;
};

// Exact top-k of row `zi` by a size-k heap (any input, NaN included). Leaves the kept
// column indices, ascending, in hp[0..k).
template <typename T>
void topk_row_heap(const T* zi, int64_t cols, int64_t k, int64_t* hp) {
  // hp[0] is the entry that would be dropped first ("worst" of the kept).
  auto worse = [zi](int64_t a, int64_t b) { return topk_before(zi[a], a, zi[b], b); };
  for (int64_t j = 0; j < k; ++j) hp[j] = j;
  std::make_heap(hp, hp + k, worse);
  // `thr` caches the root's value: one predictable compare rejects almost every
  // element; NaNs (x != x) always take the exact comparison.
  T thr = zi[hp[0]];
  for (int64_t j = k; j < cols; ++j) {
    const T x = zi[j];
    if ((x > thr || x != x) && topk_before(x, j, thr, hp[0])) {
      std::pop_heap(hp, hp + k, worse);
      hp[k - 1] = j;
      std::push_heap(hp, hp + k, worse);
      thr = zi[hp[0]];
    }
  }
  std::sort(hp, hp + k);
}

// The candidate buffers hold this many entries beyond their capacity (vector stores).
constexpr int64_t kCandSlack = 16;

#if defined(__GNUC__) && defined(__x86_64__)
// Entries >= t (no NaNs) of x[0, cols) into cv / ci in column order, 16 (float) or 8
// (double) at a time, branch-free: compare, compress, store, advance by the popcount.
// Returns their count, or -2 past `cap` (the buffers have kCandSlack entries more).
__attribute__((target("avx512f"))) static int64_t collect_avx512(const float* x, int64_t cols,
                                                                  float t, float* cv,
                                                                  int64_t* ci, int64_t cap) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i hi = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t r = cols - j;
    const __mmask16 in = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + j);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(in, v, tv, _CMP_GE_OQ);
    _mm512_storeu_ps(cv + n, _mm512_maskz_compress_ps(m, v));
    const __m512i base = _mm512_set1_epi64(j);
    const __mmask8 m0 = static_cast<__mmask8>(m), m1 = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi64(m0, _mm512_add_epi64(base, lo)));
    const int64_t n0 = n + __builtin_popcount(m0);
    _mm512_storeu_si512(ci + n0, _mm512_maskz_compress_epi64(m1, _mm512_add_epi64(base, hi)));
    n = n0 + __builtin_popcount(m1);
    if (n > cap) return -2;
  }
  return n;
}
__attribute__((target("avx512f"))) static int64_t collect_avx512(const double* x, int64_t cols,
                                                                  double t, double* cv,
                                                                  int64_t* ci, int64_t cap) {
  const __m512d tv = _mm512_set1_pd(t);
  const __m512i lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n = 0;
  for (int64_t j = 0; j < cols; j += 8) {
    const int64_t r = cols - j;
    const __mmask8 in = r >= 8 ? __mmask8(0xFF) : __mmask8((1u << r) - 1u);
    const __m512d v = _mm512_maskz_loadu_pd(in, x + j);
    const __mmask8 m = _mm512_mask_cmp_pd_mask(in, v, tv, _CMP_GE_OQ);
    _mm512_storeu_pd(cv + n, _mm512_maskz_compress_pd(m, v));
    _mm512_storeu_si512(ci + n,
                        _mm512_maskz_compress_epi64(m, _mm512_add_epi64(_mm512_set1_epi64(j), lo)));
    n += __builtin_popcount(m);
    if (n > cap) return -2;
  }
  return n;
}
#endif

// collect_avx512 where the CPU has AVX-512, else -1 (the caller scans group by group).
template <typename T>
inline int64_t collect_at_least(const T* x, int64_t cols, T t, T* cv, int64_t* ci, int64_t cap) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return collect_avx512(x, cols, t, cv, ci, cap);
#else
  (void)x, (void)cols, (void)t, (void)cv, (void)ci, (void)cap;
#endif
  return -1;
}

// Top-k of a NaN-free row by filtering. Column j belongs to group j mod G (G >= k groups);
// the k-th largest group maximum t0 is <= the row's k-th largest value (k groups have a
// maximum >= t0), so every kept entry is >= t0 and lies in a group whose maximum is >= t0.
// Steps: the group maxima (one vectorised, branch-free pass over the row); t0 by counting,
// for each maximum, the maxima above it (vectorised); the candidates from the ~k groups
// that reach t0; their exact rank (value, then lower index first). Returns false, doing
// nothing, if the row holds a NaN or too many candidates (ties): the caller then uses
// the heap.
template <typename T>
__attribute__((always_inline)) inline bool topk_row_filter_impl(const T* __restrict__ zi,
                                                                int64_t cols, int64_t k,
                                                                int64_t G, TopkScratch<T>& s,
                                                                int64_t* hp) {
  T* __restrict__ gmax = s.gmax.data();
  // NaN-sticky maxima (a NaN x is taken, and neither `x > NaN` nor `x != x` holds for a
  // number x, so a NaN maximum stays): the row has a NaN iff some group maximum is NaN,
  // so no per-element NaN count.
  for (int64_t g = 0; g < G; ++g) gmax[g] = zi[g];
  int64_t t = G;
  for (; t + G <= cols; t += G) {
    const T* __restrict__ zt = zi + t;
    for (int64_t g = 0; g < G; ++g)
      gmax[g] = ((zt[g] > gmax[g]) | (zt[g] != zt[g])) ? zt[g] : gmax[g];
  }
  for (int64_t g = 0; g < cols - t; ++g)
    gmax[g] = ((zi[t + g] > gmax[g]) | (zi[t + g] != zi[t + g])) ? zi[t + g] : gmax[g];
  int nan = 0;  // an int sum (not a bool or) so that the loop vectorises
  for (int64_t g = 0; g < G; ++g) nan += gmax[g] != gmax[g];
  if (nan) return false;
  // t0 = the smallest maximum with fewer than k maxima above it: the k-th largest.
  // The counts stay in a register: 16 maxima at a time against all the others (gmax is
  // padded with -inf to a multiple of 16; the padding never counts as above anything).
  const int64_t Gp = (G + 15) / 16 * 16;
  for (int64_t g = G; g < Gp; ++g) gmax[g] = -std::numeric_limits<T>::infinity();
  T t0 = std::numeric_limits<T>::infinity();
  for (int64_t i0 = 0; i0 < Gp; i0 += 16) {
    int32_t cnt[16] = {0};
    for (int64_t j = 0; j < G; ++j) {
      const T mj = gmax[j];
      for (int l = 0; l < 16; ++l) cnt[l] += mj > gmax[i0 + l];
    }
    // (a padding lane has all G >= k maxima above it: it never qualifies)
    T m = std::numeric_limits<T>::infinity();
    for (int l = 0; l < 16; ++l) {
      const T x = cnt[l] < k ? gmax[i0 + l] : std::numeric_limits<T>::infinity();
      m = x < m ? x : m;
    }
    t0 = m < t0 ? m : t0;
  }
  // Candidates: every entry >= t0. With AVX-512 a full vector scan (compress-stores, in
  // column order); otherwise only the groups whose maximum reaches t0 (about k of them)
  // are scanned, and the kept indices are sorted at the end.
  T* __restrict__ cv = s.cand_val.data();
  int64_t* __restrict__ ci = s.cand_idx.data();
  const int64_t cap = static_cast<int64_t>(s.cand_val.size()) - kCandSlack;
  int64_t n = collect_at_least(zi, cols, t0, cv, ci, cap);
  const bool ascending = n >= 0;
  if (n == -2) return false;  // over capacity (heavy ties)
  if (n == -1) {
    n = 0;
    for (int64_t g = 0; g < G; ++g) {
      if (gmax[g] < t0) continue;
      for (int64_t j = g; j < cols; j += G)
        if (zi[j] >= t0) {
          if (n == cap) return false;
          cv[n] = zi[j];
          ci[n++] = j;
        }
    }
  }
  if (n < k) return false;  // cannot happen (t0 is a lower bound); stay exact regardless
  // Exact rank of each candidate: larger values first, then the lower column index.
  int64_t kept = 0;
  for (int64_t a = 0; a < n; ++a) {
    int32_t rank = 0;
    const T x = cv[a];
    const int64_t ja = ci[a];
    for (int64_t b = 0; b < n; ++b) rank += (cv[b] > x) | ((cv[b] == x) & (ci[b] < ja));
    if (rank < k) hp[kept++] = ja;
  }
  if (!ascending) std::sort(hp, hp + k);
  return true;
}

AECORE_CLONES static bool topk_row_filter(const float* zi, int64_t cols, int64_t k, int64_t G,
                                          TopkScratch<float>& s, int64_t* hp) {
  return topk_row_filter_impl<float>(zi, cols, k, G, s, hp);
}
AECORE_CLONES static bool topk_row_filter(const double* zi, int64_t cols, int64_t k, int64_t G,
                                          TopkScratch<double>& s, int64_t* hp) {
  return topk_row_filter_impl<double>(zi, cols, k, G, s, hp);
}

}  // namespace detail

// Forward: for each row keep the k largest entries (ties: lower index), zero the rest.
// idx[i, :] receives the kept column indices (ascending). Small k relative to the row
// uses the filter (detail::topk_row_filter), otherwise or with NaNs a size-k heap.
template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx) {
  if (rows == 0 || cols == 0) return;
  const int nt = threads_now(rows * cols);
  // 2k groups: fewer groups make the t0 count (quadratic in G) cheaper, more make fewer
  // candidates to rank; 2k was the fastest of k, 2k, 3k and 4k in `aecore bench kernels`.
  // Below 4 elements a group the filter would not pay.
  const int64_t G = 2 * k;
  const bool filter = cols >= 4 * G;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int64_t> hp(static_cast<size_t>(k));
    detail::TopkScratch<T> scratch;
    if (filter) {
      scratch.gmax.resize(static_cast<size_t>((G + 15) / 16 * 16));
      // The exact ranking is quadratic in the candidates: past 8k of them (heavy ties)
      // the heap is cheaper.
      scratch.cand_val.resize(static_cast<size_t>(8 * k + detail::kCandSlack));
      scratch.cand_idx.resize(static_cast<size_t>(8 * k + detail::kCandSlack));
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T* zi = z + i * cols;
      if (!filter || !detail::topk_row_filter(zi, cols, k, G, scratch, hp.data()))
        detail::topk_row_heap(zi, cols, k, hp.data());
      T* __restrict__ oi = out + i * cols;
      std::memset(oi, 0, sizeof(T) * cols);
      int64_t* __restrict__ ii = idx + i * k;
      for (int64_t t = 0; t < k; ++t) {
        oi[hp[t]] = zi[hp[t]];
        ii[t] = hp[t];
      }
    }
  }
}

// Backward: grad_z = 0 except grad_z[i, idx[i,t]] = grad_out[i, idx[i,t]].
template <typename T>
void topk_backward(const T* grad_out, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                   T* grad) {
  if (rows == 0 || cols == 0) return;
  const int nt = threads_now(rows * cols);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ gi = grad + i * cols;
    const T* __restrict__ go = grad_out + i * cols;
    const int64_t* __restrict__ ii = idx + i * k;
    std::memset(gi, 0, sizeof(T) * cols);
    for (int64_t t = 0; t < k; ++t) gi[ii[t]] = go[ii[t]];
  }
}

}  // namespace cpu
}  // namespace aecore
