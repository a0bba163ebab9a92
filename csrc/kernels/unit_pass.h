// The description of one Gibbs "unit pass" shared by the CPU and CUDA kernels (torch-free).
#pragma once

#include <cstdint>

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

}  // namespace aecore
