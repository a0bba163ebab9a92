// Torch-free CPU kernels of the sparse SAE ops: the streaming top-k merge of the encoder,
// the sparse decoder (a gather-sum over the chosen dictionary rows) and the sparse
// backward passes. Codes are (rows, m) pairs of values and latent indices.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/topk_heap.h"
#include "cpu/rbm_cpu.h"

namespace aecore {
namespace cpu {
namespace detail {

// The inner loops, compiled per instruction set (AECORE_CLONES) for float and double.
template <typename T>
__attribute__((always_inline)) inline void axpy_impl(T* __restrict__ o, T v,
                                                     const T* __restrict__ w, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) o[c] += v * w[c];
}

template <typename T>
__attribute__((always_inline)) inline T dot_impl(const T* __restrict__ a, const T* __restrict__ b,
                                                 int64_t d) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

AECORE_CLONES static void axpy(float* o, float v, const float* w, int64_t d) {
  axpy_impl<float>(o, v, w, d);
}
AECORE_CLONES static void axpy(double* o, double v, const double* w, int64_t d) {
  axpy_impl<double>(o, v, w, d);
}
template <typename T>
__attribute__((always_inline)) inline void scale_impl(T* __restrict__ o, T v, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) o[c] *= v;
}

AECORE_CLONES static void scale(float* o, float v, int64_t d) { scale_impl<float>(o, v, d); }
AECORE_CLONES static void scale(double* o, double v, int64_t d) { scale_impl<double>(o, v, d); }
AECORE_CLONES static float dot(const float* a, const float* b, int64_t d) {
  return dot_impl<float>(a, b, d);
}
AECORE_CLONES static double dot(const double* a, const double* b, int64_t d) {
  return dot_impl<double>(a, b, d);
}

}  // namespace detail

// out[r, :] = bias + sum_j values[r, j] * W[idx[r, j], :]   (bias may be null: zeros)
template <typename T>
void sparse_gather_sum(const T* values, const int64_t* idx, int64_t rows, int64_t m, const T* W,
                       int64_t d, const T* bias, T* out) {
  const int nt = threads_now(rows * m * d / 8);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ o = out + r * d;
    if (bias) {
      std::memcpy(o, bias, sizeof(T) * d);
    } else {
      std::memset(o, 0, sizeof(T) * d);
    }
    for (int64_t j = 0; j < m; ++j) {
      const T v = values[r * m + j];
      if (v == T(0)) continue;  // padding and ReLU'd zeros add nothing
      detail::axpy(o, v, W + idx[r * m + j] * d, d);
    }
  }
}

// out[r, j] = <g[r, :], W[idx[r, j], :]>
template <typename T>
void sparse_dots(const T* g, const int64_t* idx, int64_t rows, int64_t m, const T* W, int64_t d,
                 T* out) {
  const int nt = threads_now(rows * m * d / 8);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ gr = g + r * d;
    for (int64_t j = 0; j < m; ++j) out[r * m + j] = detail::dot(gr, W + idx[r * m + j] * d, d);
  }
}

// grad_W[l, :] = sum over entries e = (r, j) with idx[e] == l of values[e] * src[r, :], and
// grad_b[l] = sum of those values[e] (grad_b may be null). The entries are grouped by
// latent with a counting sort (stable, so each latent sums its entries in row order): every
// output row is written by one thread, deterministically and without atomics.
template <typename T>
void sparse_accumulate(const T* values, const int64_t* idx, int64_t rows, int64_t m, const T* src,
                       int64_t d, int64_t n, T* grad_W, T* grad_b) {
  const int64_t entries = rows * m;
  std::vector<int64_t> start(static_cast<size_t>(n) + 1, 0);
  for (int64_t e = 0; e < entries; ++e) ++start[static_cast<size_t>(idx[e]) + 1];
  for (int64_t l = 0; l < n; ++l) start[l + 1] += start[l];
  std::vector<int64_t> order(static_cast<size_t>(entries));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < entries; ++e) order[static_cast<size_t>(fill[idx[e]]++)] = e;
  }
  const int nt = threads_now(std::max(entries * d / 8, n * d / 8));
  // latents differ widely in how often they fire: dynamic chunks balance the threads
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, 16)
  for (int64_t l = 0; l < n; ++l) {
    T* __restrict__ gw = grad_W + l * d;
    std::memset(gw, 0, sizeof(T) * d);
    T bsum = 0;
    for (int64_t p = start[l]; p < start[l + 1]; ++p) {
      const int64_t e = order[static_cast<size_t>(p)];
      const T v = values[e];
      bsum += v;
      if (v == T(0)) continue;
      detail::axpy(gw, v, src + (e / m) * d, d);
    }
    if (grad_b) grad_b[l] = bsum;
  }
}

// The running top-k of each row: a heap (common/topk_heap.h) ranked LargerFirst.
// Starts every row's heap empty: k entries of -inf at indices past any latent.
template <typename T>
void topk_heap_init(int64_t rows, int64_t k, T* hv, int64_t* hi) {
  for (int64_t e = 0; e < rows * k; ++e) {
    hv[e] = -std::numeric_limits<T>::infinity();
    hi[e] = std::numeric_limits<int64_t>::max();
  }
}

namespace detail {

// Offers entries c0 .. c1 of one row (pre-activation p + bias b) to its heap; false if one
// was NaN or infinite.
template <typename T>
inline bool merge_entries(const T* p, const T* b, int64_t c0, int64_t c1, int64_t col0,
                          int64_t k, T* rv, int64_t* ri) {
  bool finite = true;
  for (int64_t c = c0; c < c1; ++c) {
    const T v = p[c] + b[c];
    if (!(v - v == T(0))) {  // NaN or infinite (-inf too: it would never enter a heap)
      finite = false;
      continue;
    }
    // columns arrive in increasing order, so an equal value never displaces a kept one
    if (v <= rv[0]) continue;
    rv[0] = v;
    ri[0] = col0 + c;
    heap_sift_down(rv, ri, k, 0, LargerFirst{});
  }
  return finite;
}

// One row of a tile: blocks of 32 whose largest entry cannot enter the heap (the common
// case once it has filled) are skipped after one vectorised max.
template <typename T>
__attribute__((always_inline)) inline bool merge_row_impl(const T* __restrict__ p,
                                                          const T* __restrict__ b, int64_t cols,
                                                          int64_t col0, int64_t k, T* rv,
                                                          int64_t* ri) {
  constexpr int64_t kBlock = 32;
  bool finite = true;
  int64_t c = 0;
  for (; c + kBlock <= cols; c += kBlock) {
    T mx = -std::numeric_limits<T>::infinity();
    T bad = 0;  // NaN unless every entry is finite
#pragma omp simd reduction(max : mx) reduction(+ : bad)
    for (int64_t j = 0; j < kBlock; ++j) {
      const T v = p[c + j] + b[c + j];
      mx = v > mx ? v : mx;
      bad += v - v;
    }
    if (mx <= rv[0] && bad == T(0)) continue;
    finite = merge_entries(p, b, c, c + kBlock, col0, k, rv, ri) && finite;
  }
  return merge_entries(p, b, c, cols, col0, k, rv, ri) && finite;
}

AECORE_CLONES static bool merge_row(const float* p, const float* b, int64_t cols, int64_t col0,
                                    int64_t k, float* rv, int64_t* ri) {
  return merge_row_impl<float>(p, b, cols, col0, k, rv, ri);
}
AECORE_CLONES static bool merge_row(const double* p, const double* b, int64_t cols,
                                    int64_t col0, int64_t k, double* rv, int64_t* ri) {
  return merge_row_impl<double>(p, b, cols, col0, k, rv, ri);
}

// The merge over a listed subset of one row's columns (AuxK's dead latents; `cols` holds
// their offsets in the tile, increasing): blocks of 32 are gathered, and those whose
// largest entry cannot enter the heap are skipped.
template <typename T>
bool merge_row_listed(const T* p, const T* b, const int32_t* cols, int64_t m, int64_t col0,
                      int64_t k, T* rv, int64_t* ri) {
  constexpr int64_t kBlock = 32;
  bool finite = true;
  T v[kBlock];
  for (int64_t s = 0; s < m; s += kBlock) {
    const int64_t e = std::min(m, s + kBlock);
    T mx = -std::numeric_limits<T>::infinity();
    T bad = 0;  // NaN unless every entry is finite
    for (int64_t j = s; j < e; ++j) {
      const T x = p[cols[j]] + b[cols[j]];
      v[j - s] = x;
      mx = x > mx ? x : mx;
      bad += x - x;
    }
    if (mx <= rv[0] && bad == T(0)) continue;
    for (int64_t j = s; j < e; ++j) {
      const T x = v[j - s];
      if (!(x - x == T(0))) {  // NaN or infinite
        finite = false;
        continue;
      }
      if (x <= rv[0]) continue;
      rv[0] = x;
      ri[0] = col0 + cols[j];
      heap_sift_down(rv, ri, k, 0, LargerFirst{});
    }
  }
  return finite;
}

}  // namespace detail

// Merges one tile of pre-activations (rows, cols: latents col0 .. col0 + cols, without
// their bias) into the rows' heaps; with `mask` (n,), only the latents it marks. Returns
// false if a pre-activation offered was NaN or infinite.
template <typename T>
bool topk_merge_tile(const T* pre, int64_t rows, int64_t cols, int64_t col0, const T* b_enc,
                     int64_t k, T* hv, int64_t* hi, const bool* mask = nullptr) {
  std::vector<int32_t> listed;  // the masked columns' offsets in this tile
  if (mask != nullptr)
    for (int64_t c = 0; c < cols; ++c)
      if (mask[col0 + c]) listed.push_back(static_cast<int32_t>(c));
  const int64_t m = static_cast<int64_t>(listed.size());
  if (mask != nullptr && m == 0) return true;
  const int nt = threads_now(rows * (mask == nullptr ? cols : m));
  bool finite = true;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static) reduction(&& : finite)
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = pre + r * cols;
    finite = (mask == nullptr
                  ? detail::merge_row(p, b_enc + col0, cols, col0, k, hv + r * k, hi + r * k)
                  : detail::merge_row_listed(p, b_enc + col0, listed.data(), m, col0, k,
                                             hv + r * k, hi + r * k)) &&
             finite;
  }
  return finite;
}

// Sorts each row's heap best first and writes the values, ReLU'd, to `values`.
template <typename T>
void topk_heap_finish(int64_t rows, int64_t k, T* hv, int64_t* hi, T* values) {
  const int nt = threads_now(rows * k * 8);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* rv = hv + r * k;
    int64_t* ri = hi + r * k;
    heap_sort_best_first(rv, ri, k, LargerFirst{});
    for (int64_t j = 0; j < k; ++j) {
      values[r * k + j] = rv[j] > T(0) ? rv[j] : T(0);
      // a slot never filled (AuxK with fewer dead latents than aux_k) names latent 0
      // with value 0: the door's padding
      if (ri[j] == std::numeric_limits<int64_t>::max()) ri[j] = 0;
    }
  }
}

// grad[r] -= (<grad[r], w[r]> / |w[r]|^2) w[r] for each row (rows of zeros left alone).
template <typename T>
void remove_parallel(T* grad, const T* w, int64_t rows, int64_t d) {
  const int nt = threads_now(rows * d);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* g = grad + r * d;
    const T* wr = w + r * d;
    const T sq = detail::dot(wr, wr, d);
    if (sq > T(0)) detail::axpy(g, -detail::dot(g, wr, d) / sq, wr, d);
  }
}

// w[r] *= norm / |w[r]| for each row (rows of zeros left alone).
template <typename T>
void set_row_norms(T* w, int64_t rows, int64_t d, T norm) {
  const int nt = threads_now(rows * d);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    T* wr = w + r * d;
    const T sq = detail::dot(wr, wr, d);
    if (sq > T(0)) detail::scale(wr, norm / std::sqrt(sq), d);
  }
}

}  // namespace cpu
}  // namespace aecore
