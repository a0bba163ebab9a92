// A warp's step of the streaming top-k kernels: offer 32 consecutive columns (one per
// lane) to the row's heap in shared memory (common/topk_heap.h). A ballot skips columns
// that cannot enter; lane 0 inserts the rest in column order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/topk_heap.h"

namespace aecore {
namespace cuda {

// Lane l offers value x at column `col` (consecutive over the lanes) when `valid`;
// `stage` is 32 values of shared memory for this warp. Every lane of the warp calls it.
template <typename T, class Better>
__device__ void warp_offer(T x, int64_t col, bool valid, T* hv, int64_t* hi, int64_t k,
                           T* stage, Better better) {
  const int lane = threadIdx.x % 32;
  const unsigned mask = __ballot_sync(0xffffffffu, valid && better(x, col, hv[0], hi[0]));
  if (mask == 0) return;
  stage[lane] = x;
  __syncwarp();
  if (lane == 0) {  // col is lane 0's column here
    for (unsigned bits = mask; bits != 0; bits &= bits - 1) {
      const int src = __ffs(bits) - 1;
      const T v = stage[src];
      if (better(v, col + src, hv[0], hi[0])) {
        hv[0] = v;
        hi[0] = col + src;
        heap_sift_down(hv, hi, k, 0, better);
      }
    }
  }
  __syncwarp();
}

}  // namespace cuda
}  // namespace aecore
