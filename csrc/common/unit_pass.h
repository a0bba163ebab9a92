// The description of one Gibbs "unit pass" shared by the CPU and CUDA kernels (torch-free).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/philox.h"  // AECORE_HD

namespace aecore {

enum class Unit { Bernoulli, Gaussian };

// One pass over a (rows, cols) row-major GEMM output `x`:
//   x[i,j]     <- mean(x[i,j] + bias[j])   (sigmoid for Bernoulli units, identity for Gaussian)
//   state[i,j] <- a sample when `sample` (u < mean, or mean + N(0,1)), else the mean;
//                 skipped when state is null.
// `noise` (x's layout) replaces Philox when given: uniforms in [0,1) for Bernoulli units,
// standard normals for Gaussian ones; it is the exact-comparison path the tests use.
// `rng` points at {seed, offset} (host memory for CPU kernels, device memory for CUDA).
// Accumulators are nullable and added to: column sums of means, of states and of `data`
// (x's layout); sq_err gets sum_ij (data - mean)^2.
template <typename T>
struct UnitPass {
  T* x = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const T* bias = nullptr;
  Unit unit = Unit::Bernoulli;
  bool sample = true;
  T* state = nullptr;
  const T* noise = nullptr;
  const int64_t* rng = nullptr;
  uint32_t stream = 0;
  double* colsum_mean = nullptr;
  double* colsum_state = nullptr;
  const T* data = nullptr;
  double* colsum_data = nullptr;
  double* sq_err = nullptr;
};

// The last step of cd_step: the bias statistics and the reconstruction error from the
// accumulator buffer acc = [sum ph0 (H) | sum ph_k (H) | sum v (V) | sum v_k (V) | sq (1)]:
//   db_v = sum v / B - sum v_k / Bc,  db_h = sum ph0 / B - sum ph_k / Bc,
//   recon = sq / B, with inv_b = 1 / max(B, 1), inv_bc = 1 / max(Bc, 1).
template <typename T>
struct StatsFinal {
  const double* acc = nullptr;
  int64_t V = 0;
  int64_t H = 0;
  double inv_b = 1.0;
  double inv_bc = 1.0;
  T* db_v = nullptr;
  T* db_h = nullptr;
  T* recon = nullptr;
};

// Element e of the finalisation (e < V: db_v, e < V + H: db_h, e == V + H: recon), so
// that the CPU loop and a CUDA thread per element share it.
template <typename T>
AECORE_HD void finalize_stats_element(const StatsFinal<T>& f, int64_t e) {
  const double* sum_ph0 = f.acc;
  const double* sum_phk = f.acc + f.H;
  const double* sum_v = f.acc + 2 * f.H;
  const double* sum_vk = f.acc + 2 * f.H + f.V;
  if (e < f.V) {
    f.db_v[e] = static_cast<T>(sum_v[e] * f.inv_b - sum_vk[e] * f.inv_bc);
  } else if (e < f.V + f.H) {
    const int64_t j = e - f.V;
    f.db_h[j] = static_cast<T>(sum_ph0[j] * f.inv_b - sum_phk[j] * f.inv_bc);
  } else if (e == f.V + f.H) {
    const double sq = f.acc[2 * f.H + 2 * f.V];
    *f.recon = static_cast<T>(sq * f.inv_b);
  }
}

}  // namespace aecore
