// Torch-free CPU kernels for top-k sparsification: per row, the k largest entries kept
// and the rest zeroed (forward), the gradient passed to the kept entries (backward).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/rbm_cpu.h"
#include "common/sparsity_common.h"

namespace aecore {
namespace cpu {

namespace detail {

// The candidate buffers hold this many entries beyond their capacity (vector stores).
constexpr int64_t kCandSlack = 64;

// Per-thread buffers of the filtered top-k for k kept entries and G groups: the group
// maxima (padded to a multiple of 16), and up to 8k candidates (past that, heavy ties,
// the exact ranking would cost more than the heap).
template <typename T>
struct TopkScratch {
  TopkScratch(int64_t k, int64_t G)
      : gmax(static_cast<size_t>((G + 15) / 16 * 16)),
        cand_val(static_cast<size_t>(8 * k + kCandSlack)),
        cand_idx(static_cast<size_t>(8 * k + kCandSlack)),
        cand_col(static_cast<size_t>(8 * k + kCandSlack)) {}
  std::vector<T> gmax, cand_val;
  std::vector<int64_t> cand_idx;
  std::vector<int32_t> cand_col;  // the AVX-512 float path's candidate columns
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

#if defined(__GNUC__) && defined(__x86_64__)
// Entries >= t (no NaNs) of x[0, cols) into cv / ci in column order, 8 at a time,
// branch-free: compare, compress, store, advance by the popcount. Returns their count, or
// -2 past `cap` (the buffers have kCandSlack entries more). (Float rows on AVX-512 take
// topk_row_filter_avx512.)
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

// collect_avx512 for double rows where the CPU has AVX-512, else -1 (the caller scans
// group by group).
template <typename T>
inline int64_t collect_at_least(const T* x, int64_t cols, T t, T* cv, int64_t* ci, int64_t cap) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same<T, double>::value) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) return collect_avx512(x, cols, t, cv, ci, cap);
  }
#endif
  (void)x, (void)cols, (void)t, (void)cv, (void)ci, (void)cap;
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

AECORE_CLONES static bool topk_row_filter_generic(const float* zi, int64_t cols, int64_t k,
                                                  int64_t G, TopkScratch<float>& s, int64_t* hp) {
  return topk_row_filter_impl<float>(zi, cols, k, G, s, hp);
}
AECORE_CLONES static bool topk_row_filter_generic(const double* zi, int64_t cols, int64_t k,
                                                  int64_t G, TopkScratch<double>& s, int64_t* hp) {
  return topk_row_filter_impl<double>(zi, cols, k, G, s, hp);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define AECORE_TOPK_AVX512 1
// topk_row_filter_impl for float in AVX-512, the same steps and result. What the generic
// loops leave to the compiler costs there: the group maxima round-trip through memory
// every step, the candidates' count is a serial chain through each vector's popcount, and
// the ranking reduces a vector to a scalar per candidate. Here the maxima stay in
// registers (two sets, alternate steps, to halve the dependency chain), the candidates'
// offsets in a block of four vectors come from popcounts off the chain, only their column
// (int32) is compressed, and the ranks are counted sixteen candidates at a time.
// GCC 12 flags the intrinsics' internal _mm512_undefined_* (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline __mmask16 first_lanes(int64_t n) {  // the first n of 16 lanes (n may be out of range)
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}

// Maxima of groups [c0, c0 + 16 NQ) (clipped to G) into gmax; whether a NaN was seen.
template <int NQ>
__attribute__((target("avx512f"))) inline bool group_maxima_avx512(const float* zi, int64_t cols,
                                                                     int64_t G, int64_t c0,
                                                                     float* gmax) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 lane[NQ], nan = 0;
  __m512 a[NQ], b[NQ];
  for (int q = 0; q < NQ; ++q) {
    lane[q] = first_lanes(G - c0 - 16 * q);
    a[q] = _mm512_mask_loadu_ps(ninf, lane[q], zi + c0 + 16 * q);
    b[q] = ninf;
    nan |= _mm512_cmp_ps_mask(a[q], a[q], _CMP_UNORD_Q);
  }
  int64_t t = G;
  for (; t + 2 * G <= cols; t += 2 * G)
    for (int q = 0; q < NQ; ++q) {
      const __m512 x = _mm512_maskz_loadu_ps(lane[q], zi + t + c0 + 16 * q);
      const __m512 y = _mm512_maskz_loadu_ps(lane[q], zi + t + G + c0 + 16 * q);
      nan |= _mm512_cmp_ps_mask(x, y, _CMP_UNORD_Q);
      a[q] = _mm512_max_ps(x, a[q]);  // max_ps(x, m) is m where x is NaN
      b[q] = _mm512_max_ps(y, b[q]);
    }
  for (; t < cols; t += G)  // the last step, and a partial one at the row's end
    for (int q = 0; q < NQ; ++q) {
      const __mmask16 in = lane[q] & first_lanes(cols - (t + c0 + 16 * q));
      const __m512 x = _mm512_mask_loadu_ps(ninf, in, zi + t + c0 + 16 * q);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      a[q] = _mm512_max_ps(x, a[q]);
    }
  for (int q = 0; q < NQ; ++q) _mm512_storeu_ps(gmax + c0 + 16 * q, _mm512_max_ps(a[q], b[q]));
  return nan != 0;
}

// topk_row_filter_impl for float in AVX-512, the same steps and result. What the generic
// loops leave to the compiler costs there: the group maxima round-trip through memory
// every step, the candidates' count is a serial chain through each vector's popcount, and
// the ranking reduces a vector to a scalar per candidate. Here the maxima stay in
// registers (two sets, alternate steps, to halve the dependency chain), the candidates'
// offsets in a block of four vectors come from popcounts off the chain, only their column
// (int32) is compressed, and the ranks are counted sixteen candidates at a time.
__attribute__((target("avx512f"))) static bool topk_row_filter_avx512(const float* zi,
                                                                       int64_t cols, int64_t k,
                                                                       int64_t G,
                                                                       TopkScratch<float>& s,
                                                                       int64_t* hp) {
  float* __restrict__ gmax = s.gmax.data();
  // 1) group maxima, up to 64 groups (four vectors in registers) per pass over the row
  bool nan = false;
  for (int64_t c0 = 0; c0 < G; c0 += 64) {
    switch (std::min<int64_t>(4, (G - c0 + 15) / 16)) {
      case 1: nan |= group_maxima_avx512<1>(zi, cols, G, c0, gmax); break;
      case 2: nan |= group_maxima_avx512<2>(zi, cols, G, c0, gmax); break;
      case 3: nan |= group_maxima_avx512<3>(zi, cols, G, c0, gmax); break;
      default: nan |= group_maxima_avx512<4>(zi, cols, G, c0, gmax); break;
    }
  }
  if (nan) return false;
  // 2) t0, the k-th largest maximum: for sixteen maxima at a time, how many are above
  const int64_t Gp = (G + 15) / 16 * 16;
  for (int64_t g = G; g < Gp; ++g) gmax[g] = -std::numeric_limits<float>::infinity();
  const __m512i one = _mm512_set1_epi32(1), kv = _mm512_set1_epi32(static_cast<int>(k));
  float t0 = std::numeric_limits<float>::infinity();
  for (int64_t i0 = 0; i0 < Gp; i0 += 16) {
    const __m512 m = _mm512_loadu_ps(gmax + i0);
    __m512i cnt = _mm512_setzero_si512();
    for (int64_t j = 0; j < G; ++j) {
      const __mmask16 above = _mm512_cmp_ps_mask(_mm512_set1_ps(gmax[j]), m, _CMP_GT_OQ);
      cnt = _mm512_mask_add_epi32(cnt, above, cnt, one);
    }
    // (a padding lane has all G >= k maxima above it: it never qualifies)
    const __mmask16 qualifies = _mm512_cmp_epi32_mask(cnt, kv, _MM_CMPINT_LT);
    t0 = std::min(t0, _mm512_mask_reduce_min_ps(qualifies, m));
  }
  // 3) the candidates, entries >= t0, in column order: per block of four vectors the
  // masks and popcounts first, then the compressed columns at their offsets
  int32_t* __restrict__ cc = s.cand_col.data();
  const int64_t cap = static_cast<int64_t>(s.cand_col.size()) - kCandSlack;
  const __m512 tv = _mm512_set1_ps(t0);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < cols; j0 += 64) {
    __mmask16 m[4];
    int64_t off[4];
    int64_t sum = n;
    for (int q = 0; q < 4; ++q) {
      const __mmask16 in = first_lanes(cols - (j0 + 16 * q));
      m[q] = _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, zi + j0 + 16 * q), tv,
                                     _CMP_GE_OQ);
      off[q] = sum;
      sum += __builtin_popcount(m[q]);
    }
    for (int q = 0; q < 4; ++q) {
      const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0 + 16 * q)), iota);
      _mm512_storeu_si512(cc + off[q], _mm512_maskz_compress_epi32(m[q], col));
    }
    n = sum;
    if (n > cap) return false;  // heavy ties: the heap is cheaper
  }
  if (n < k) return false;  // cannot happen (t0 is a lower bound); stay exact regardless
  float* __restrict__ cv = s.cand_val.data();
  for (int64_t a = 0; a < n; ++a) cv[a] = zi[cc[a]];
  // 4) exact ranks, sixteen candidates at a time: larger values first, then lower columns
  int64_t kept = 0;
  for (int64_t a0 = 0; a0 < n; a0 += 16) {
    const __mmask16 valid = first_lanes(n - a0);
    const __m512 va = _mm512_maskz_loadu_ps(valid, cv + a0);
    const __m512i ia = _mm512_maskz_loadu_epi32(valid, cc + a0);
    __m512i rank = _mm512_setzero_si512();
    for (int64_t b = 0; b < n; ++b) {
      const __m512 xb = _mm512_set1_ps(cv[b]);
      const __mmask16 before =
          _mm512_cmp_ps_mask(xb, va, _CMP_GT_OQ) |
          (_mm512_cmp_ps_mask(xb, va, _CMP_EQ_OQ) &
           _mm512_cmp_epi32_mask(_mm512_set1_epi32(cc[b]), ia, _MM_CMPINT_LT));
      rank = _mm512_mask_add_epi32(rank, before, rank, one);
    }
    const __mmask16 keep = valid & _mm512_cmp_epi32_mask(rank, kv, _MM_CMPINT_LT);
    alignas(64) int32_t cols_kept[16];
    _mm512_store_si512(cols_kept, _mm512_maskz_compress_epi32(keep, ia));
    const int c = __builtin_popcount(keep);
    for (int l = 0; l < c; ++l) hp[kept + l] = cols_kept[l];
    kept += c;
  }
  return kept == k;
}
#pragma GCC diagnostic pop
#endif

// Top-k of a row by filtering (see topk_row_filter_impl) on the fastest path this CPU
// has; false, doing nothing, where the caller must use the heap.
template <typename T>
inline bool topk_row_filter(const T* zi, int64_t cols, int64_t k, int64_t G, TopkScratch<T>& s,
                            int64_t* hp) {
#ifdef AECORE_TOPK_AVX512
  if constexpr (std::is_same<T, float>::value) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512 && cols <= std::numeric_limits<int32_t>::max())
      return topk_row_filter_avx512(zi, cols, k, G, s, hp);
  }
#endif
  return topk_row_filter_generic(zi, cols, k, G, s, hp);
}

}  // namespace detail

// Forward: for each row keep the k largest entries (ties: lower index), zero the rest.
// idx[i, :] receives the kept column indices (ascending). Small k relative to the row
// uses the filter (detail::topk_row_filter), otherwise or with NaNs a size-k heap.
template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx) {
  if (rows == 0 || cols == 0) return;
  const int nt = threads_now(rows * cols);
  // About 2k groups: fewer groups make the t0 count (quadratic in G) cheaper, more make
  // fewer candidates to rank; 2k was the fastest of k, 2k, 3k and 4k in `aecore bench
  // kernels`. Rounded up to whole 16-lane vectors, which the AVX-512 path loads whole.
  // Below 4 elements a group the filter would not pay.
  const int64_t G = (2 * k + 15) / 16 * 16;
  const bool filter = cols >= 4 * G;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int64_t> hp(static_cast<size_t>(k));
    detail::TopkScratch<T> scratch(filter ? k : 0, filter ? G : 0);
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
