// Torch-free CPU kernels for the sparsity penalties: the KL sparsity penalty (forward:
// one read of h; backward: one write of the gradient) and top-k sparsification.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rbm_cpu.h"

namespace aecore {
namespace cpu {

// rho-hat is clamped to [kKlEps, 1 - kKlEps] before the logs, so the penalty stays finite
// for dead (always 0) or saturated (always 1) units. Same constant in reference.py.
constexpr double kKlEps = 1e-6;

// KL(rho || q) and its derivative in q, with q clamped; `inside` is false where the clamp
// was active (then the gradient through the clamp is zero, as for torch.clamp).
inline double kl_term(double rho, double q) {
  const double qc = std::min(std::max(q, kKlEps), 1.0 - kKlEps);
  return rho * std::log(rho / qc) + (1.0 - rho) * std::log((1.0 - rho) / (1.0 - qc));
}
inline double kl_dterm(double rho, double q) {
  if (!(q >= kKlEps && q <= 1.0 - kKlEps)) return 0.0;  // clamped (or NaN)
  return -rho / q + (1.0 - rho) / (1.0 - q);
}

// Forward: mean[j] = mean_i h[i,j]; returns beta * sum_j KL(rho || mean[j]).
template <typename T>
double kl_sparsity_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta,
                           T* mean) {
  std::vector<double> sums(static_cast<size_t>(cols), 0.0);
  column_sums(h, rows, cols, sums.data());
  double loss = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    const double q = sums[j] / static_cast<double>(rows);
    mean[j] = static_cast<T>(q);
    loss += kl_term(rho, q);
  }
  return beta * loss;
}

// Backward: d loss / d h[i,j] is the same for every row i, so the per-column coefficient
// is computed once (O(cols)) and the pass over the gradient is a pure write.
// grad_mean (nullable) is the incoming gradient of the `mean` output.
template <typename T>
void kl_sparsity_backward(T grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                          int64_t cols, double rho, double beta, T* grad) {
  if (rows == 0 || cols == 0) return;
  std::vector<T> coef(static_cast<size_t>(cols));
  const double inv_b = 1.0 / static_cast<double>(rows);
  for (int64_t j = 0; j < cols; ++j) {
    double c = static_cast<double>(grad_loss) * beta * kl_dterm(rho, static_cast<double>(mean[j]));
    if (grad_mean) c += static_cast<double>(grad_mean[j]);
    coef[j] = static_cast<T>(c * inv_b);
  }
  const T* __restrict__ cf = coef.data();
  const int nt = num_threads_for(rows * cols);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t i = 0; i < rows; ++i) std::memcpy(grad + i * cols, cf, sizeof(T) * cols);
}

// Total order used by top-k: NaN above everything (as torch.topk), then by value, and
// among equal values the lower index first. `a_idx < b_idx` breaks ties.
template <typename T>
inline bool topk_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Forward: for each row keep the k largest entries (ties: lower index), zero the rest.
// idx[i, :] receives the kept column indices (ascending). A size-k min-heap over the row
// keeps the pass O(cols + k log k · hits); after the first few entries almost every
// element is rejected by one comparison with the heap's root.
template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx) {
  if (rows == 0 || cols == 0) return;
  const int nt = num_threads_for(rows * cols);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<int64_t> heap(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T* __restrict__ zi = z + i * cols;
      // heap[0] is the entry that would be dropped first ("worst" of the kept).
      auto worse = [zi](int64_t a, int64_t b) { return topk_before(zi[a], a, zi[b], b); };
      int64_t* hp = heap.data();
      for (int64_t j = 0; j < k; ++j) hp[j] = j;
      std::make_heap(hp, hp + k, worse);
      for (int64_t j = k; j < cols; ++j) {
        if (topk_before(zi[j], j, zi[hp[0]], hp[0])) {
          std::pop_heap(hp, hp + k, worse);
          hp[k - 1] = j;
          std::push_heap(hp, hp + k, worse);
        }
      }
      std::sort(hp, hp + k);
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
  const int nt = num_threads_for(rows * cols);
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
