// CUDA kernels of the sparsity penalties. KL: the forward's column sums come from
// rbm_cuda.cu (column_partials, a plane per block of rows); a column per thread adds its
// planes into the mean and its KL term, each block sums its terms, and one small block
// adds those into the loss (fixed orders: the same bits every run). The backward is one
// write pass. Top-k: one warp per row keeps the row's running top k in a
// shared-memory heap and a ballot over 32 columns at a time skips those that cannot
// enter it, so the row is read once (k up to kMaxHeap; beyond, a block per row picks
// the k entries in k rounds).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/topk_heap.h"
#include "cuda/kernels.cuh"
#include "cuda/warp_heap.cuh"
#include "common/sparsity_common.h"

namespace aecore {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// The sum of the block's kThreads values of `s` (a tree, the same order every run), in
// thread 0.
__device__ double block_sum(double s, double* sh) {
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  return sh[0];
}

// One thread per column: its planes' partial sums in plane order, the mean, and the KL
// term; block b's terms summed into block_terms[b].
template <typename T>
__global__ void kl_columns_kernel(const double* __restrict__ partial, int64_t planes,
                                  int64_t rows, int64_t cols, double rho, T* __restrict__ mean,
                                  double* __restrict__ block_terms) {
  __shared__ double sh[kThreads];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double term = 0.0;
  if (j < cols) {
    double s = 0.0;
    for (int64_t p = 0; p < planes; ++p) s += partial[p * cols + j];
    const double q = s / static_cast<double>(rows);
    mean[j] = static_cast<T>(q);
    term = kl_term(rho, q);
  }
  const double total = block_sum(term, sh);
  if (threadIdx.x == 0) block_terms[blockIdx.x] = total;
}

// One block: loss[0] = beta * the sum of the column blocks' terms.
template <typename T>
__global__ void kl_loss_kernel(const double* __restrict__ block_terms, int64_t blocks,
                               double beta, T* __restrict__ loss) {
  __shared__ double sh[kThreads];
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) s += block_terms[b];
  const double total = block_sum(s, sh);
  if (threadIdx.x == 0) *loss = static_cast<T>(beta * total);
}

// The gradient is constant along a column: one thread per column writes the row that
// every row of h shares (the caller broadcasts it).
template <typename T>
__global__ void kl_backward_kernel(const T* __restrict__ grad_loss, const T* __restrict__ grad_mean,
                                   const T* __restrict__ mean, int64_t rows, int64_t cols,
                                   double rho, double beta, T* __restrict__ grad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double c = static_cast<double>(*grad_loss) * beta * kl_dterm(rho, static_cast<double>(mean[j]));
  if (grad_mean) c += static_cast<double>(grad_mean[j]);
  grad[j] = static_cast<T>(c / static_cast<double>(rows));
}

// One block per row, k rounds: each round every thread finds, among its strided
// elements, the best one ranked after the previous pick (the order is total: NaN first,
// then value, then lower index), and a shared-memory argmax picks the next kept entry.
// No mask is needed; O(k * cols / threads) per row, aimed at the small k of k-sparse
// autoencoders.
template <typename T>
__global__ void topk_kernel(const T* __restrict__ z, int64_t cols, int64_t k, T* __restrict__ out,
                            int64_t* __restrict__ idx) {
  __shared__ T sv[kThreads];
  __shared__ int64_t si[kThreads];
  __shared__ T prev_v;
  __shared__ int64_t prev_i;
  const int64_t row = blockIdx.x;
  const T* zi = z + row * cols;
  T* oi = out + row * cols;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) oi[j] = T(0);
  for (int64_t t = 0; t < k; ++t) {
    T best_v = T(0);
    int64_t best_i = -1;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const T x = zi[j];
      if (t > 0 && !topk_before(prev_v, prev_i, x, j)) continue;  // already kept
      if (best_i < 0 || topk_before(x, j, best_v, best_i)) {
        best_v = x;
        best_i = j;
      }
    }
    sv[threadIdx.x] = best_v;
    si[threadIdx.x] = best_i;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
      if (threadIdx.x < w) {
        const int64_t oi2 = si[threadIdx.x + w];
        if (oi2 >= 0 && (si[threadIdx.x] < 0 ||
                         topk_before(sv[threadIdx.x + w], oi2, sv[threadIdx.x], si[threadIdx.x]))) {
          sv[threadIdx.x] = sv[threadIdx.x + w];
          si[threadIdx.x] = oi2;
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      prev_v = sv[0];
      prev_i = si[0];
      idx[row * k + t] = si[0];
      oi[si[0]] = sv[0];
    }
    __syncthreads();
  }
}

// topk_before as a heap ranking (common/topk_heap.h): NaN first, then larger values.
struct NanFirst {
  template <typename T>
  __device__ bool operator()(T a, int64_t ia, T b, int64_t ib) const {
    return topk_before(a, ia, b, ib);
  }
};

constexpr int kTopkWarps = 4;
constexpr int kTopkRounds = 8;

template <typename T>
__global__ void topk_warp_kernel(const T* __restrict__ z, int64_t rows, int64_t cols, int64_t k,
                                 T* __restrict__ out, int64_t* __restrict__ idx) {
  __shared__ T sh_v[kTopkWarps][kMaxHeap];
  __shared__ int64_t sh_i[kTopkWarps][kMaxHeap];
  __shared__ T sh_c[kTopkWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTopkWarps + warp;
  if (row >= rows) return;
  T* hv = sh_v[warp];
  int64_t* hi = sh_i[warp];
  // every real entry ranks before this sentinel (cols >= k replaces them all)
  for (int64_t j = lane; j < k; j += 32) {
    hv[j] = -INFINITY;
    hi[j] = INT64_MAX;
  }
  __syncwarp();
  const T* zi = z + row * cols;
  // kTopkRounds rounds of 32 columns are loaded before the first is offered (in column
  // order), so the warp waits on one batch of loads instead of one load per round
  for (int64_t c0 = 0; c0 < cols; c0 += 32 * kTopkRounds) {
    T x[kTopkRounds];
#pragma unroll
    for (int u = 0; u < kTopkRounds; ++u) {
      const int64_t c = c0 + u * 32 + lane;
      x[u] = c < cols ? zi[c] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kTopkRounds; ++u) {
      const int64_t c = c0 + u * 32 + lane;
      warp_offer(x[u], c, c < cols, hv, hi, k, sh_c[warp], NanFirst{});
    }
  }
  T* oi = out + row * cols;
  for (int64_t j = lane; j < cols; j += 32) oi[j] = T(0);
  __syncwarp();
  for (int64_t t = lane; t < k; t += 32) {
    oi[hi[t]] = hv[t];
    idx[row * k + t] = hi[t];
  }
}

template <typename T>
__global__ void topk_backward_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ idx,
                                     int64_t cols, int64_t k, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  T* gi = grad + row * cols;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) gi[j] = T(0);
  __syncthreads();
  for (int64_t t = threadIdx.x; t < k; t += kThreads) {
    const int64_t j = idx[row * k + t];
    gi[j] = grad_out[row * cols + j];
  }
}

}  // namespace

static int64_t kl_column_blocks(int64_t cols) { return (cols + kThreads - 1) / kThreads; }

int64_t kl_forward_workspace(int64_t rows, int64_t cols) {
  return column_partials_planes(rows, cols) * cols + kl_column_blocks(cols);
}

template <typename T>
void kl_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta, T* mean,
                T* loss, double* workspace, cudaStream_t stream) {
  const int64_t planes = column_partials_planes(rows, cols);
  const int64_t blocks = kl_column_blocks(cols);
  double* block_terms = workspace + planes * cols;
  if (cols > 0) {
    column_partials<T>(h, rows, cols, workspace, stream);
    kl_columns_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        workspace, planes, rows, cols, rho, mean, block_terms);
  }
  kl_loss_kernel<T><<<1, kThreads, 0, stream>>>(block_terms, blocks, beta, loss);  // 0 if none
}

template <typename T>
void kl_backward(const T* grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                 int64_t cols, double rho, double beta, T* grad, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t gx = (cols + kThreads - 1) / kThreads;
  kl_backward_kernel<T><<<static_cast<unsigned>(gx), kThreads, 0, stream>>>(
      grad_loss, grad_mean, mean, rows, cols, rho, beta, grad);
}

template <typename T>
void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out, int64_t* idx,
                  cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (k <= kMaxHeap) {
    const unsigned grid = static_cast<unsigned>((rows + kTopkWarps - 1) / kTopkWarps);
    topk_warp_kernel<T><<<grid, kTopkWarps * 32, 0, stream>>>(z, rows, cols, k, out, idx);
    return;
  }
  topk_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, cols, k, out, idx);
}

template <typename T>
void topk_backward(const T* grad_out, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                   T* grad, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  topk_backward_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(grad_out, idx, cols,
                                                                               k, grad);
}

#define AECORE_INSTANTIATE(T)                                                                     \
  template void kl_forward<T>(const T*, int64_t, int64_t, double, double, T*, T*, double*,      \
                              cudaStream_t);                                                      \
  template void kl_backward<T>(const T*, const T*, const T*, int64_t, int64_t, double, double,  \
                               T*, cudaStream_t);                                                 \
  template void topk_forward<T>(const T*, int64_t, int64_t, int64_t, T*, int64_t*, cudaStream_t); \
  template void topk_backward<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, T*,        \
                                 cudaStream_t);
AECORE_INSTANTIATE(float)
AECORE_INSTANTIATE(double)
#undef AECORE_INSTANTIATE

}  // namespace cuda
}  // namespace aecore
