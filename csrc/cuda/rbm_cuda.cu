// CUDA Gibbs unit pass: bias + mean function + Philox sample + column sums in one pass
// over a GEMM output. One thread owns a group of 4 adjacent columns (one Philox call
// gives its 4 uniforms, the same counters as the CPU kernel) and strides over rows,
// reading and writing its 4 columns with one vector access each where the rows are
// aligned (a warp then touches one contiguous span per instruction); column sums are
// reduced over the block's rows in shared memory, written per block to a workspace, and
// added in block order by a second kernel (deterministic: no atomics).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.cuh"
#include "common/philox.h"

namespace aecore {
namespace cuda {
namespace {

constexpr int kBX = 32;  // column groups per block
constexpr int kBY = 8;   // rows per block (then grid-stride)
// Blocks of rows at most: more rows are grid-strided, so each thread sums several and
// the partial sums' workspace (gy x cols) and their ordered addition stay small.
constexpr int64_t kMaxRowBlocks = 64;

__device__ __forceinline__ float sigmoid_d(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

// Four adjacent elements in one access (p aligned to 4 elements), or one at a time.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double (&v)[4]) {
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(v[2], v[3]);
}
template <typename T>
__device__ __forceinline__ void load_n(const T* p, int n, bool vec, T (&v)[4]) {
  if (vec) {
    load4(p, v);
  } else {
    for (int l = 0; l < 4; ++l) v[l] = l < n ? p[l] : T(0);
  }
}
template <typename T>
__device__ __forceinline__ void store_n(T* p, int n, bool vec, const T (&v)[4]) {
  if (vec) {
    store4(p, v);
  } else {
    for (int l = 0; l < n; ++l) p[l] = v[l];
  }
}

template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// Sums v over threadIdx.y (same threadIdx.x) and stores the total to *slot from row 0.
// All threads of the block must call it (it synchronises).
__device__ void block_col_sum(double v, double* slot, double (*sh)[kBX], bool valid) {
  sh[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    double s = 0.0;
    for (int y = 0; y < kBY; ++y) s += sh[y][threadIdx.x];
    *slot = s;
  }
  __syncthreads();
}

// dst[j] += sum_b partial[b * cols + j] over b < blocks, in order: one thread a column.
__global__ void add_partials_kernel(const double* __restrict__ partial, int64_t blocks,
                                    int64_t cols, double* __restrict__ dst) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double s = 0.0;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + j];
  dst[j] += s;
}

void add_partials(const double* partial, int64_t blocks, int64_t cols, double* dst,
                  cudaStream_t stream) {
  add_partials_kernel<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(
      partial, blocks, cols, dst);
}

// The workspace of a unit pass with gy blocks of rows: the partial column sums of
// means, states and data ([3][gy][cols]), then one partial sq per block ([gy][gx]).
template <typename T>
__global__ void unit_pass_kernel(UnitPass<T> a, double* __restrict__ partial) {
  __shared__ double sh[kBY][kBX];
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kBX + threadIdx.x;
  const int64_t c0 = 4 * g;
  const bool active = c0 < a.cols;
  const bool philox = a.sample && a.noise == nullptr && a.state != nullptr;
  uint32_t k0 = 0, k1 = 0, offset = 0;
  if (philox) {
    seed_to_key(static_cast<uint64_t>(a.rng[0]), k0, k1);
    offset = static_cast<uint32_t>(a.rng[1]);
  }
  double acc_mean[4] = {0, 0, 0, 0}, acc_state[4] = {0, 0, 0, 0}, acc_data[4] = {0, 0, 0, 0};
  double sq = 0.0;
  if (active) {
    // columns of this group that exist, and whether whole groups can move as vectors
    const int n = a.cols - c0 < 4 ? static_cast<int>(a.cols - c0) : 4;
    const bool vec = n == 4 && a.cols % 4 == 0 && aligned4(a.x) && aligned4(a.bias) &&
                     aligned4(a.data) && aligned4(a.state) && aligned4(a.noise);
    T bias[4];
    load_n(a.bias + c0, n, vec, bias);
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * kBY + threadIdx.y; i < a.rows;
         i += static_cast<int64_t>(gridDim.y) * kBY) {
      Philox4x32 r = {{0, 0, 0, 0}};
      if (philox)
        r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(i), a.stream, offset, k0,
                          k1);
      T z[4] = {0, 0, 0, 0};
      if (philox && a.unit == Unit::Gaussian) {
        box_muller<T>(r.v[0], r.v[1], z[0], z[1]);
        box_muller<T>(r.v[2], r.v[3], z[2], z[3]);
      }
      const int64_t e0 = i * a.cols + c0;
      T x[4], data[4], noise[4], state[4];
      load_n(a.x + e0, n, vec, x);
      if (a.data) load_n(a.data + e0, n, vec, data);
      if (a.noise) load_n(a.noise + e0, n, vec, noise);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (l >= n) break;
        T m = x[l] + bias[l];
        if (a.unit == Unit::Bernoulli) m = sigmoid_d(m);
        x[l] = m;
        acc_mean[l] += static_cast<double>(m);
        if (a.data) {
          const double d = static_cast<double>(data[l]);
          const double diff = d - static_cast<double>(m);
          sq += diff * diff;
          acc_data[l] += d;
        }
        if (a.state) {
          T s;
          if (!a.sample) {
            s = m;
          } else if (a.unit == Unit::Bernoulli) {
            const T u = a.noise ? noise[l] : uniform01<T>(r.v[l]);
            s = u < m ? T(1) : T(0);
          } else {
            s = m + (a.noise ? noise[l] : z[l]);
          }
          state[l] = s;
          acc_state[l] += static_cast<double>(s);
        }
      }
      store_n(a.x + e0, n, vec, x);
      if (a.state) store_n(a.state + e0, n, vec, state);
    }
  }
  const int64_t plane = static_cast<int64_t>(gridDim.y) * a.cols;
  double* const row = partial + static_cast<int64_t>(blockIdx.y) * a.cols + c0;
  for (int l = 0; l < 4; ++l) {
    const bool valid = active && c0 + l < a.cols;
    if (a.colsum_mean) block_col_sum(acc_mean[l], row + l, sh, valid);
    if (a.colsum_state) block_col_sum(acc_state[l], row + plane + l, sh, valid);
    if (a.colsum_data) block_col_sum(acc_data[l], row + 2 * plane + l, sh, valid);
  }
  if (a.sq_err) {
    // whole-block sum of sq: reduce over x as well (kBX * kBY values)
    sh[threadIdx.y][threadIdx.x] = sq;
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      double s = 0.0;
      for (int y = 0; y < kBY; ++y)
        for (int x = 0; x < kBX; ++x) s += sh[y][x];
      partial[3 * plane + static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
    }
  }
}

// Blocks for `rows` rows (kBY a block, at most kMaxRowBlocks, then grid-stride) by
// `items` per row (kBX a block).
inline dim3 row_grid(int64_t rows, int64_t items) {
  const int64_t gx = (items + kBX - 1) / kBX;
  int64_t gy = (rows + kBY - 1) / kBY;
  if (gy > kMaxRowBlocks) gy = kMaxRowBlocks;
  if (gy < 1) gy = 1;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

// The unit pass: one thread per group of 4 columns.
inline dim3 grid_for(int64_t rows, int64_t cols) { return row_grid(rows, (cols + 3) / 4); }

// Partial column sums of the block's rows: partial[blockIdx.y][j].
template <typename T>
__global__ void column_sums_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                                   double* __restrict__ partial) {
  __shared__ double sh[kBY][kBX];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBX + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kBY;
  double s = 0.0;
  if (j < cols) {
    int64_t i = static_cast<int64_t>(blockIdx.y) * kBY + threadIdx.y;
    // four rows' loads in flight before they are added (in row order, as one at a time)
    for (; i + 3 * step < rows; i += 4 * step) {
      const T a = x[i * cols + j], b = x[(i + step) * cols + j];
      const T c = x[(i + 2 * step) * cols + j], d = x[(i + 3 * step) * cols + j];
      s += static_cast<double>(a);
      s += static_cast<double>(b);
      s += static_cast<double>(c);
      s += static_cast<double>(d);
    }
    for (; i < rows; i += step) s += static_cast<double>(x[i * cols + j]);
  }
  block_col_sum(s, partial + static_cast<int64_t>(blockIdx.y) * cols + j, sh, j < cols);
}

template <typename T>
__global__ void finalize_stats_kernel(StatsFinal<T> f) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  finalize_stats_element(f, e);
}

}  // namespace

template <typename T>
void finalize_stats(const StatsFinal<T>& f, cudaStream_t stream) {
  const int64_t n = f.V + f.H + 1;
  finalize_stats_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(f);
}

int64_t unit_pass_workspace(int64_t rows, int64_t cols) {
  const dim3 grid = grid_for(rows, cols);
  return static_cast<int64_t>(grid.y) * (3 * cols + grid.x);
}

int64_t column_partials_planes(int64_t rows, int64_t cols) {
  return static_cast<int64_t>(row_grid(rows, cols).y);
}

template <typename T>
void unit_pass(const UnitPass<T>& p, double* workspace, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return;
  const dim3 grid = grid_for(p.rows, p.cols);
  unit_pass_kernel<T><<<grid, dim3(kBX, kBY), 0, stream>>>(p, workspace);
  const int64_t plane = static_cast<int64_t>(grid.y) * p.cols;
  if (p.colsum_mean) add_partials(workspace, grid.y, p.cols, p.colsum_mean, stream);
  if (p.colsum_state) add_partials(workspace + plane, grid.y, p.cols, p.colsum_state, stream);
  if (p.colsum_data) add_partials(workspace + 2 * plane, grid.y, p.cols, p.colsum_data, stream);
  if (p.sq_err)  // the blocks' sq as one column of grid.y * grid.x entries
    add_partials(workspace + 3 * plane, static_cast<int64_t>(grid.y) * grid.x, 1, p.sq_err,
                 stream);
}

template <typename T>
void column_partials(const T* x, int64_t rows, int64_t cols, double* partial,
                     cudaStream_t stream) {
  column_sums_kernel<T><<<row_grid(rows, cols), dim3(kBX, kBY), 0, stream>>>(x, rows, cols,
                                                                            partial);
}

// The momentum update's two passes: the check clears a device flag (a benign race: every
// writer stores false), the update reads it, so no value comes back to the host.
template <typename T>
__global__ void check_finite_kernel(const T* __restrict__ s, int64_t n, bool* ok) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    if (!isfinite(s[i])) *ok = false;
  }
}

template <typename T>
__global__ void momentum_update_kernel(T* __restrict__ p, T* __restrict__ v,
                                       const T* __restrict__ s, int64_t n, T lr, T momentum,
                                       T weight_decay, const bool* ok) {
  if (!*ok) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const T vi = momentum * v[i] + lr * (s[i] - weight_decay * p[i]);
    v[i] = vi;
    p[i] += vi;
  }
}

inline unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <typename T>
void check_finite(const T* s, int64_t n, bool* ok, cudaStream_t stream) {
  if (n == 0) return;
  check_finite_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(s, n, ok);
}

template <typename T>
void momentum_update(T* p, T* v, const T* s, int64_t n, T lr, T momentum, T weight_decay,
                     const bool* ok, cudaStream_t stream) {
  if (n == 0) return;
  momentum_update_kernel<T><<<elementwise_blocks(n), 256, 0, stream>>>(p, v, s, n, lr, momentum,
                                                                       weight_decay, ok);
}

template void check_finite<float>(const float*, int64_t, bool*, cudaStream_t);
template void check_finite<double>(const double*, int64_t, bool*, cudaStream_t);
template void momentum_update<float>(float*, float*, const float*, int64_t, float, float, float,
                                     const bool*, cudaStream_t);
template void momentum_update<double>(double*, double*, const double*, int64_t, double, double,
                                      double, const bool*, cudaStream_t);
template void unit_pass<float>(const UnitPass<float>&, double*, cudaStream_t);
template void unit_pass<double>(const UnitPass<double>&, double*, cudaStream_t);
template void finalize_stats<float>(const StatsFinal<float>&, cudaStream_t);
template void finalize_stats<double>(const StatsFinal<double>&, cudaStream_t);
template void column_partials<float>(const float*, int64_t, int64_t, double*, cudaStream_t);
template void column_partials<double>(const double*, int64_t, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace aecore
