// Launchers of aecore's CUDA kernels (torch-free: CUDA runtime only). Every launcher
// enqueues on `stream` and returns without synchronising. Defined for T = float, double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/unit_pass.h"

namespace aecore {
namespace cuda {

// The Gibbs unit pass (see common/unit_pass.h); `rng` and all buffers are device memory;
// accumulators are added to with atomics, so the caller zeroes them.
template <typename T>
void unit_pass(const UnitPass<T>& p, cudaStream_t stream);

// cd_step's bias statistics and reconstruction error (common/unit_pass.h, StatsFinal).
template <typename T>
void finalize_stats(const StatsFinal<T>& f, cudaStream_t stream);

// out[j] += sum_i x[i, j]  (out zeroed by the caller).
template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, double* out, cudaStream_t stream);

// mean[j] = sums[j] / rows; loss[0] = beta * sum_j KL(rho || clamp(mean[j])).
template <typename T>
void kl_finalize(const double* sums, int64_t rows, int64_t cols, double rho, double beta, T* mean,
                 T* loss, cudaStream_t stream);

// grad[i, j] = (grad_loss * beta * dKL/dq(mean[j]) + grad_mean[j]) / rows; grad_loss is a
// device scalar, grad_mean may be null.
template <typename T>
void kl_backward(const T* grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                 int64_t cols, double rho, double beta, T* grad, cudaStream_t stream);

// Row-wise top-k (NaN largest, ties to the lower index); idx gets the kept columns.
template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx,
                  cudaStream_t stream);

// grad = 0 except grad[i, idx[i, t]] = grad_out[i, idx[i, t]].
template <typename T>
void topk_backward(const T* grad_out, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                   T* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace aecore
