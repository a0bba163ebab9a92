// Launchers of aecore's CUDA kernels (torch-free: CUDA runtime only). Every launcher
// enqueues on `stream` and returns without synchronising. Defined for T = float, double,
// and the sparse SAE kernels also for __half and __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/unit_pass.h"

namespace aecore {
namespace cuda {

// Column sums are deterministic: each block of rows writes its partial sums to a
// workspace, and a second kernel adds them in block order (atomics would add them in
// whatever order the blocks finish, so results would differ in the last bit between
// runs, and a seeded training run would not repeat). The workspace, in doubles:
int64_t unit_pass_workspace(int64_t rows, int64_t cols);
int64_t column_partials_planes(int64_t rows, int64_t cols);
int64_t kl_forward_workspace(int64_t rows, int64_t cols);

// The Gibbs unit pass (see common/unit_pass.h); `rng` and all buffers are device memory;
// the accumulators are added to.
template <typename T>
void unit_pass(const UnitPass<T>& p, double* workspace, cudaStream_t stream);

// cd_step's bias statistics and reconstruction error (common/unit_pass.h, StatsFinal).
template <typename T>
void finalize_stats(const StatsFinal<T>& f, cudaStream_t stream);

// Column sums in column_partials_planes(rows, cols) planes of `cols` doubles:
// partial[p * cols + j] sums plane p's rows of column j (rows >= 1, cols >= 1).
template <typename T>
void column_partials(const T* x, int64_t rows, int64_t cols, double* partial,
                     cudaStream_t stream);

// mean[j] = sum_i h[i, j] / rows; loss[0] = beta * sum_j KL(rho || clamp(mean[j]));
// rows >= 1; workspace: kl_forward_workspace(rows, cols) doubles.
template <typename T>
void kl_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta, T* mean,
                T* loss, double* workspace, cudaStream_t stream);

// grad[j] = (grad_loss * beta * dKL/dq(mean[j]) + grad_mean[j]) / rows: the gradient of
// every row of h (cols values); grad_loss is a device scalar, grad_mean may be null.
template <typename T>
void kl_backward(const T* grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                 int64_t cols, double rho, double beta, T* grad, cudaStream_t stream);

// Clears the device flag *ok if some s[i] is not finite.
template <typename T>
void check_finite(const T* s, int64_t n, bool* ok, cudaStream_t stream);

// Where *ok (device): v = momentum * v + lr * (s - weight_decay * p); p += v.
template <typename T>
void momentum_update(T* p, T* v, const T* s, int64_t n, T lr, T momentum, T weight_decay,
                     const bool* ok, cudaStream_t stream);

// Row-wise top-k (NaN largest, ties to the lower index); idx gets the kept columns.
template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx,
                  cudaStream_t stream);

// grad = 0 except grad[i, idx[i, t]] = grad_out[i, idx[i, t]].
template <typename T>
void topk_backward(const T* grad_out, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                   T* grad, cudaStream_t stream);

// --- sparse SAE kernels (sae_cuda.cu) -------------------------------------------------

// The accumulation type: float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// The most entries per row the streaming top-k keeps (its heap lives in shared memory).
constexpr int64_t kMaxHeap = 256;

// out[r, :] = bias + sum_j values[r, j] * W[idx[r, j], :]  (bias may be null).
template <typename T>
void sae_gather_sum(const T* values, const int64_t* idx, int64_t rows, int64_t m, const T* W,
                    int64_t d, const T* bias, T* out, cudaStream_t stream);

// out[e] = <g[e / m, :], W[idx[e], :]> for the rows * m entries e.
template <typename T>
void sae_dots(const T* g, const int64_t* idx, int64_t rows, int64_t m, const T* W, int64_t d,
              T* out, cudaStream_t stream);

// grad_W[l, :] = sum over p in [start[l], start[l + 1]) of values[e] * src[e / m, :] with
// e = order[p], and grad_b[l] the sum of those values (grad_b may be null).
template <typename T>
void sae_accumulate(const T* values, const int64_t* order, const int64_t* start, int64_t m,
                    const T* src, int64_t d, int64_t n, T* grad_W, T* grad_b,
                    cudaStream_t stream);

// The streaming top-k (k <= kMaxHeap): heaps of (value, latent) per row, started empty,
// merged with tiles of pre-activations (latents col0 .. col0 + cols, bias b_enc added;
// *bad set to 1 on a NaN or an infinity; with `mask` (n,), only the latents it marks),
// then sorted best first into values (ReLU'd).
template <typename T>
void sae_heap_init(int64_t rows, int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i,
                   cudaStream_t stream);
template <typename T>
void sae_merge_tile(const T* pre, int64_t rows, int64_t cols, int64_t col0, const T* b_enc,
                    int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i, int* bad,
                    const bool* mask, cudaStream_t stream);
template <typename T>
void sae_heap_finish(int64_t rows, int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i,
                     T* values, cudaStream_t stream);

// The decoder constraint's row passes (in place): grad rows lose their component along
// w's rows; w's rows scaled to norm. Rows of zeros are left alone.
template <typename T>
void sae_remove_parallel(T* grad, const T* w, int64_t rows, int64_t d, cudaStream_t stream);
template <typename T>
void sae_set_row_norms(T* w, int64_t rows, int64_t d, double norm, cudaStream_t stream);

}  // namespace cuda
}  // namespace aecore
