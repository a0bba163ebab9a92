// CUDA kernels of the sparse SAE ops (torch-free: CUDA runtime only), for T = float,
// double, __half and __nv_bfloat16 with float accumulation (double for double).
//   gather_sum: one block per row, threads across the columns, the row's code in shared
//     memory: coalesced reads of the chosen dictionary rows.
//   dots: one warp per (row, slot), a shuffle reduction.
//   accumulate: one block per latent over its entries, which the caller has grouped by
//     latent (a stable sort): deterministic, no atomics.
//   top-k merge: one warp per row holds the row's running top k as a min-heap in shared
//     memory; a ballot over 32 columns at a time skips those that cannot enter it.
//   row passes: a block per row holds the row in registers (rows of 129 to 1024 packs),
//     so it is read once; other rows, a warp per row reading them twice.
// gather_sum, dots, accumulate and the decoder's row passes move packs of V adjacent
// columns per lane: 16-byte packs where every row starts on a 16-byte boundary (d a
// multiple of the pack, aligned tensors), single values otherwise; the same arithmetic
// in the same order either way, except the row passes' block-per-row kernel (its sums
// agree to rounding).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <initializer_list>

#include "common/topk_heap.h"
#include "cuda/kernels.cuh"
#include "cuda/warp_heap.cuh"

namespace aecore {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type load(const T* p) {
  return static_cast<typename AccOf<T>::type>(*p);
}
template <>
__device__ __forceinline__ float load<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ T store(typename AccOf<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Packs of V adjacent values moved by one load or store: 16-byte packs (8 half or
// bfloat16 values a lane, where a scalar load moves 2) keep 8x the bytes in flight, but
// need every row on a 16-byte boundary (the launchers check); V = 1 is the scalar
// access that any row allows. The kernels take V as a parameter, so both are one code.
template <int Bytes>
struct PackBits;
template <>
struct PackBits<2> {
  using type = unsigned short;
};
template <>
struct PackBits<4> {
  using type = unsigned int;
};
template <>
struct PackBits<8> {
  using type = uint2;
};
template <>
struct PackBits<16> {
  using type = uint4;
};

template <typename T>
constexpr int kWide = 16 / sizeof(T);  // values in a 16-byte pack

template <typename T, int V>
struct Pack {
  typename PackBits<V * sizeof(T)>::type bits;
  __device__ __forceinline__ typename AccOf<T>::type operator[](int i) const {
    return load(reinterpret_cast<const T*>(&bits) + i);
  }
  __device__ __forceinline__ void set(int i, typename AccOf<T>::type v) {
    reinterpret_cast<T*>(&bits)[i] = store<T>(v);
  }
};

// Pack q of a row (values q * V .. q * V + V - 1).
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* row, int64_t q) {
  using Bits = typename PackBits<V * sizeof(T)>::type;
  return Pack<T, V>{reinterpret_cast<const Bits*>(row)[q]};
}
template <int V, typename T>
__device__ __forceinline__ void store_pack(T* row, int64_t q, const Pack<T, V>& pack) {
  using Bits = typename PackBits<V * sizeof(T)>::type;
  reinterpret_cast<Bits*>(row)[q] = pack.bits;
}

// Whether rows of d values at these addresses all start on 16-byte boundaries.
template <typename T>
bool packs_fit(int64_t d, std::initializer_list<const void*> bases) {
  if (d % kWide<T> != 0) return false;
  for (const void* base : bases) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  }
  return true;
}

constexpr int kThreads = 128;
constexpr int kCodeChunk = 512;  // code entries per row staged in shared memory at once

// Stages up to kCodeChunk of a row's code entries (from entry e0, `left` remaining) in
// shared memory for the whole block; returns how many. Every thread of the block calls it.
template <typename T>
__device__ int64_t stage_code(const T* __restrict__ values, const int64_t* __restrict__ idx,
                              int64_t e0, int64_t left, typename AccOf<T>::type* sv,
                              int64_t* si) {
  const int64_t chunk = left < kCodeChunk ? left : kCodeChunk;
  __syncthreads();  // the previous chunk is used up
  for (int64_t j = threadIdx.x; j < chunk; j += kThreads) {
    sv[j] = load(values + e0 + j);
    si[j] = idx[e0 + j];
  }
  __syncthreads();
  return chunk;
}

// One block per row; each thread sums a pack of V adjacent columns.
template <typename T, int V>
__global__ void gather_sum_kernel(const T* __restrict__ values, const int64_t* __restrict__ idx,
                                  int64_t m, const T* __restrict__ W, int64_t d,
                                  const T* __restrict__ bias, T* __restrict__ out) {
  using A = typename AccOf<T>::type;
  __shared__ A sv[kCodeChunk];
  __shared__ int64_t si[kCodeChunk];
  const int64_t r = blockIdx.x;
  const int64_t packs = d / V;
  for (int64_t q0 = 0; q0 < packs; q0 += kThreads) {
    const int64_t q = q0 + threadIdx.x;
    A acc[V];
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] = 0;
    if (bias != nullptr && q < packs) {
      const Pack<T, V> b = load_pack<V>(bias, q);
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] = b[u];
    }
    for (int64_t j0 = 0; j0 < m; j0 += kCodeChunk) {
      const int64_t chunk = stage_code(values, idx, r * m + j0, m - j0, sv, si);
      if (q >= packs) continue;  // (still at every barrier)
      for (int64_t j = 0; j < chunk; ++j) {
        const A v = sv[j];
        if (v == A(0)) continue;  // padding and ReLU'd zeros add nothing
        const Pack<T, V> w = load_pack<V>(W + si[j] * d, q);
#pragma unroll
        for (int u = 0; u < V; ++u) acc[u] += v * w[u];
      }
    }
    if (q < packs) {
      Pack<T, V> o;
#pragma unroll
      for (int u = 0; u < V; ++u) o.set(u, acc[u]);
      store_pack<V>(out + r * d, q, o);
    }
  }
}

// One warp per (row, slot); each lane reads packs of V adjacent columns.
template <typename T, int V>
__global__ void dots_kernel(const T* __restrict__ g, const int64_t* __restrict__ idx,
                            int64_t entries, int64_t m, const T* __restrict__ W, int64_t d,
                            T* __restrict__ out) {
  using A = typename AccOf<T>::type;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (e >= entries) return;  // whole warps leave together (entries are per warp)
  const T* gr = g + (e / m) * d;
  const T* w = W + idx[e] * d;
  A acc = 0;
  for (int64_t q = lane; q < d / V; q += 32) {
    const Pack<T, V> a = load_pack<V>(gr, q), b = load_pack<V>(w, q);
#pragma unroll
    for (int u = 0; u < V; ++u) acc += a[u] * b[u];
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[e] = store<T>(acc);
}

// Latent l's entries are order[start[l] .. start[l + 1]) (entry e = row * m + slot); each
// thread sums a pack of V adjacent columns over them, in order. Blocks (l, y) split latent
// l's packs, so a latent chosen by many rows is spread over several blocks;
// kAccumulateBatch entries' loads are issued before their products are added, so a
// thread waits on one batch of loads instead of on each entry.
constexpr int kAccumulateBatch = 4;

template <typename T, int V>
__global__ void accumulate_kernel(const T* __restrict__ values, const int64_t* __restrict__ order,
                                  const int64_t* __restrict__ start, int64_t m,
                                  const T* __restrict__ src, int64_t d, T* __restrict__ grad_W,
                                  T* __restrict__ grad_b) {
  using A = typename AccOf<T>::type;
  constexpr int E = kAccumulateBatch;
  const int64_t l = blockIdx.x;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t p0 = start[l], p1 = start[l + 1];
  if (grad_b != nullptr && blockIdx.y == 0 && threadIdx.x == 0) {
    A s = 0;
    for (int64_t p = p0; p < p1; ++p) s += load(values + order[p]);
    grad_b[l] = store<T>(s);
  }
  if (q >= d / V) return;
  A acc[V];
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] = 0;
  int64_t p = p0;
  for (; p + E <= p1; p += E) {
    A v[E];
    Pack<T, V> row[E];
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const int64_t e = order[p + j];
      v[j] = load(values + e);
      row[j] = Pack<T, V>{};
      // as the CPU kernel: a zero takes nothing from src
      if (v[j] != A(0)) row[j] = load_pack<V>(src + (e / m) * d, q);
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (v[j] == A(0)) continue;
#pragma unroll
      for (int u = 0; u < V; ++u) acc[u] += v[j] * row[j][u];
    }
  }
  for (; p < p1; ++p) {
    const int64_t e = order[p];
    const A v = load(values + e);
    if (v == A(0)) continue;
    const Pack<T, V> row = load_pack<V>(src + (e / m) * d, q);
#pragma unroll
    for (int u = 0; u < V; ++u) acc[u] += v * row[u];
  }
  Pack<T, V> out;
#pragma unroll
  for (int u = 0; u < V; ++u) out.set(u, acc[u]);
  store_pack<V>(grad_W + l * d, q, out);
}

// --- the streaming top-k ------------------------------------------------------------

constexpr int kMergeWarps = 4;
constexpr int kMergeRounds = 8;

// One warp per row. The heap (k <= kMaxHeap entries) is loaded into shared memory,
// merged with the tile's columns in increasing order, and written back.
template <typename T>
__global__ void merge_tile_kernel(const T* __restrict__ pre, int64_t rows, int64_t cols,
                                  int64_t col0, const T* __restrict__ b_enc, int64_t k,
                                  typename AccOf<T>::type* __restrict__ heap_v,
                                  int64_t* __restrict__ heap_i, int* __restrict__ bad,
                                  const bool* __restrict__ mask) {
  using A = typename AccOf<T>::type;
  __shared__ A sh_v[kMergeWarps][kMaxHeap];
  __shared__ int64_t sh_i[kMergeWarps][kMaxHeap];
  __shared__ A sh_c[kMergeWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (r >= rows) return;
  A* hv = sh_v[warp];
  int64_t* hi = sh_i[warp];
  for (int64_t j = lane; j < k; j += 32) {
    hv[j] = heap_v[r * k + j];
    hi[j] = heap_i[r * k + j];
  }
  __syncwarp();
  const T* p = pre + r * cols;
  // kMergeRounds rounds of 32 columns are loaded before the first is offered, so a warp
  // waits on one batch of loads instead of one load per round; offered in column order
  for (int64_t c0 = 0; c0 < cols; c0 += 32 * kMergeRounds) {
    A v[kMergeRounds];
    bool offered[kMergeRounds];
#pragma unroll
    for (int u = 0; u < kMergeRounds; ++u) {
      const int64_t c = c0 + u * 32 + lane;
      offered[u] = c < cols && (mask == nullptr || mask[col0 + c]);
      v[u] = -INFINITY;
      if (offered[u]) {
        v[u] = load(p + c) + load(b_enc + col0 + c);
        if (!isfinite(v[u])) {  // NaN or infinite, as on the CPU
          atomicExch(bad, 1);
          v[u] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMergeRounds; ++u) {
      warp_offer(v[u], col0 + c0 + u * 32 + lane, offered[u], hv, hi, k, sh_c[warp],
                 LargerFirst{});
    }
  }
  for (int64_t j = lane; j < k; j += 32) {
    heap_v[r * k + j] = hv[j];
    heap_i[r * k + j] = hi[j];
  }
}

// One thread per row: heap sort (best first), the ReLU, the values in T.
template <typename T>
__global__ void heap_finish_kernel(int64_t rows, int64_t k, typename AccOf<T>::type* heap_v,
                                   int64_t* heap_i, T* __restrict__ values) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  auto* hv = heap_v + r * k;
  int64_t* hi = heap_i + r * k;
  heap_sort_best_first(hv, hi, k, LargerFirst{});
  for (int64_t j = 0; j < k; ++j) {
    values[r * k + j] = store<T>(hv[j] > 0 ? hv[j] : 0);
    if (hi[j] < 0) hi[j] = 0;  // a slot never filled names latent 0 with value 0
  }
}

template <typename A>
__global__ void heap_init_kernel(int64_t n, A* heap_v, int64_t* heap_i) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  heap_v[e] = -INFINITY;
  heap_i[e] = -1;
}

// One warp per row: the row's squared norm and dot product, then the row update;
// each lane on packs of V adjacent columns.
// Not __restrict__: set_row_norms_ passes the same rows as target and w.
template <typename T, int V>
__global__ void row_constraint_kernel(T* target, const T* w, int64_t rows, int64_t d,
                                      double norm, bool project) {
  using A = typename AccOf<T>::type;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  T* t = target + r * d;
  const T* wr = w + r * d;
  const int64_t packs = d / V;
  A sq = 0, dp = 0;
  for (int64_t q = lane; q < packs; q += 32) {
    const Pack<T, V> wp = load_pack<V>(wr, q);
    if (project) {
      const Pack<T, V> tp = load_pack<V>(static_cast<const T*>(t), q);
#pragma unroll
      for (int u = 0; u < V; ++u) {
        sq += wp[u] * wp[u];
        dp += tp[u] * wp[u];
      }
    } else {
#pragma unroll
      for (int u = 0; u < V; ++u) sq += wp[u] * wp[u];
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    sq += __shfl_xor_sync(0xffffffffu, sq, off);
    dp += __shfl_xor_sync(0xffffffffu, dp, off);
  }
  if (!(sq > A(0))) return;  // a row of zeros is left alone
  const A coef = project ? dp / sq : static_cast<A>(norm) / sqrt(sq);
  for (int64_t q = lane; q < packs; q += 32) {
    Pack<T, V> tp = load_pack<V>(static_cast<const T*>(t), q);
    if (project) {
      const Pack<T, V> wp = load_pack<V>(wr, q);
#pragma unroll
      for (int u = 0; u < V; ++u) tp.set(u, tp[u] - coef * wp[u]);
    } else {
#pragma unroll
      for (int u = 0; u < V; ++u) tp.set(u, tp[u] * coef);
    }
    store_pack<V>(t, q, tp);
  }
}

// The same passes with each row read once: a block per row holds the row (and the
// gradient row) in registers, up to kRowCache packs a thread, so the second half of the
// pass writes from them instead of reading the row again. blockDim.x: a multiple of 32,
// at most kRowThreads, times kRowCache packs covering the row.
constexpr int kRowCache = 4;
constexpr int kRowThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kRowThreads) row_constraint_cached_kernel(T* target, const T* w, int64_t d, double norm,
                                             bool project) {
  using A = typename AccOf<T>::type;
  __shared__ A sh_sq[kRowThreads / 32], sh_dp[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  T* t = target + r * d;
  const T* wr = w + r * d;
  const int64_t packs = d / V;
  Pack<T, V> wp[kRowCache], tp[kRowCache];
  A sq = 0, dp = 0;
#pragma unroll
  for (int i = 0; i < kRowCache; ++i) {
    const int64_t q = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (q >= packs) continue;
    wp[i] = load_pack<V>(wr, q);
    if (project) tp[i] = load_pack<V>(static_cast<const T*>(t), q);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      sq += wp[i][u] * wp[i][u];
      if (project) dp += tp[i][u] * wp[i][u];
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    sq += __shfl_xor_sync(0xffffffffu, sq, off);
    dp += __shfl_xor_sync(0xffffffffu, dp, off);
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    sh_sq[warp] = sq;
    sh_dp[warp] = dp;
  }
  __syncthreads();
  sq = 0;
  dp = 0;
  for (int k = 0; k < warps; ++k) {  // every thread adds the warps' sums in one order
    sq += sh_sq[k];
    dp += sh_dp[k];
  }
  if (!(sq > A(0))) return;  // a row of zeros is left alone (the same for every thread)
  const A coef = project ? dp / sq : static_cast<A>(norm) / sqrt(sq);
#pragma unroll
  for (int i = 0; i < kRowCache; ++i) {
    const int64_t q = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
    if (q >= packs) continue;
    Pack<T, V> out;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      out.set(u, project ? tp[i][u] - coef * wp[i][u] : wp[i][u] * coef);
    }
    store_pack<V>(t, q, out);
  }
}

unsigned blocks(int64_t n, int per) { return static_cast<unsigned>((n + per - 1) / per); }

// Threads a row for the cached pass, a multiple of 32; 0 where the warp kernel serves
// better: a row too long for a block, or one a warp covers (a block per row of one warp
// would halve the resident rows, and a short row's second read hits the cache anyway).
template <typename T>
int cached_row_threads(int64_t d) {
  const int64_t packs = d / kWide<T>;
  const int64_t threads = (packs + kRowCache - 1) / kRowCache;
  if (threads > kRowThreads || threads <= 32) return 0;
  return static_cast<int>((threads + 31) / 32 * 32);
}

// remove_parallel_ (project: target the gradient) or set_row_norms_ (target == w).
template <typename T>
void row_constraint(T* target, const T* w, int64_t rows, int64_t d, double norm, bool project,
                    cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  const bool packed = project ? packs_fit<T>(d, {target, w}) : packs_fit<T>(d, {w});
  const int threads = packed ? cached_row_threads<T>(d) : 0;
  if (threads > 0 && rows <= INT_MAX) {  // a block per row: the grid's x limit
    row_constraint_cached_kernel<T, kWide<T>><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        target, w, d, norm, project);
    return;
  }
  const auto kernel = packed ? row_constraint_kernel<T, kWide<T>> : row_constraint_kernel<T, 1>;
  kernel<<<blocks(rows * 32, 256), 256, 0, stream>>>(target, w, rows, d, norm, project);
}


}  // namespace

// Each launcher runs its kernel on 16-byte packs where every row starts on a 16-byte
// boundary, else on single values.
template <typename T>
void sae_gather_sum(const T* values, const int64_t* idx, int64_t rows, int64_t m, const T* W,
                    int64_t d, const T* bias, T* out, cudaStream_t stream) {
  if (rows == 0 || d == 0) return;
  const auto kernel = packs_fit<T>(d, {W, out, bias})  // (a null bias is aligned)
                          ? gather_sum_kernel<T, kWide<T>>
                          : gather_sum_kernel<T, 1>;
  kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(values, idx, m, W, d, bias, out);
}

template <typename T>
void sae_dots(const T* g, const int64_t* idx, int64_t rows, int64_t m, const T* W, int64_t d,
              T* out, cudaStream_t stream) {
  const int64_t entries = rows * m;
  if (entries == 0) return;
  const auto kernel = packs_fit<T>(d, {g, W}) ? dots_kernel<T, kWide<T>> : dots_kernel<T, 1>;
  kernel<<<blocks(entries * 32, 256), 256, 0, stream>>>(g, idx, entries, m, W, d, out);
}

template <typename T>
void sae_accumulate(const T* values, const int64_t* order, const int64_t* start, int64_t m,
                    const T* src, int64_t d, int64_t n, T* grad_W, T* grad_b,
                    cudaStream_t stream) {
  if (n == 0) return;
  const bool wide = packs_fit<T>(d, {src, grad_W});
  const int64_t packs = wide ? d / kWide<T> : d;
  const auto kernel = wide ? accumulate_kernel<T, kWide<T>> : accumulate_kernel<T, 1>;
  const dim3 grid(static_cast<unsigned>(n), blocks(packs, kThreads));
  kernel<<<grid, kThreads, 0, stream>>>(values, order, start, m, src, d, grad_W, grad_b);
}

template <typename T>
void sae_heap_init(int64_t rows, int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i,
                   cudaStream_t stream) {
  const int64_t n = rows * k;
  if (n == 0) return;
  heap_init_kernel<<<blocks(n, 256), 256, 0, stream>>>(n, heap_v, heap_i);
}

template <typename T>
void sae_merge_tile(const T* pre, int64_t rows, int64_t cols, int64_t col0, const T* b_enc,
                    int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i, int* bad,
                    const bool* mask, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  merge_tile_kernel<T><<<blocks(rows, kMergeWarps), kMergeWarps * 32, 0, stream>>>(
      pre, rows, cols, col0, b_enc, k, heap_v, heap_i, bad, mask);
}

template <typename T>
void sae_heap_finish(int64_t rows, int64_t k, typename AccOf<T>::type* heap_v, int64_t* heap_i,
                     T* values, cudaStream_t stream) {
  if (rows == 0) return;
  heap_finish_kernel<T><<<blocks(rows, 128), 128, 0, stream>>>(rows, k, heap_v, heap_i, values);
}

template <typename T>
void sae_remove_parallel(T* grad, const T* w, int64_t rows, int64_t d, cudaStream_t stream) {
  row_constraint<T>(grad, w, rows, d, 0.0, true, stream);
}

template <typename T>
void sae_set_row_norms(T* w, int64_t rows, int64_t d, double norm, cudaStream_t stream) {
  row_constraint<T>(w, w, rows, d, norm, false, stream);
}

#define AECORE_SAE_INSTANTIATE(T)                                                               \
  template void sae_gather_sum<T>(const T*, const int64_t*, int64_t, int64_t, const T*, int64_t, \
                                  const T*, T*, cudaStream_t);                                   \
  template void sae_dots<T>(const T*, const int64_t*, int64_t, int64_t, const T*, int64_t, T*,   \
                            cudaStream_t);                                                       \
  template void sae_accumulate<T>(const T*, const int64_t*, const int64_t*, int64_t, const T*,   \
                                  int64_t, int64_t, T*, T*, cudaStream_t);                       \
  template void sae_heap_init<T>(int64_t, int64_t, AccOf<T>::type*, int64_t*, cudaStream_t);     \
  template void sae_merge_tile<T>(const T*, int64_t, int64_t, int64_t, const T*, int64_t,        \
                                  AccOf<T>::type*, int64_t*, int*, const bool*, cudaStream_t);                \
  template void sae_heap_finish<T>(int64_t, int64_t, AccOf<T>::type*, int64_t*, T*,              \
                                   cudaStream_t);                                                \
  template void sae_remove_parallel<T>(T*, const T*, int64_t, int64_t, cudaStream_t);            \
  template void sae_set_row_norms<T>(T*, int64_t, int64_t, double, cudaStream_t);

AECORE_SAE_INSTANTIATE(float)
AECORE_SAE_INSTANTIATE(double)
AECORE_SAE_INSTANTIATE(__half)
AECORE_SAE_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace aecore
