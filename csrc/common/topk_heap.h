// A row's running top k as a size-k heap whose root is the worst kept entry (values hv,
// indices hi): shared by the CPU and CUDA top-k kernels (torch-free, host and device).
// `better(a, ia, b, ib)` is the kernels' ranking: true if (a, ia) ranks before (b, ib).
#pragma once

#include <cstdint>

#include "common/philox.h"  // AECORE_HD

namespace aecore {

// Larger first, and among equal values the lower index (the SAE kernels' ranking).
struct LargerFirst {
  template <typename T>
  AECORE_HD bool operator()(T a, int64_t ia, T b, int64_t ib) const {
    return a > b || (a == b && ia < ib);
  }
};

// Restores the heap below `pos` after its entry changed (moves it towards the leaves).
template <typename T, class Better>
AECORE_HD void heap_sift_down(T* hv, int64_t* hi, int64_t k, int64_t pos, Better better) {
  for (;;) {
    int64_t worst = pos;
    const int64_t l = 2 * pos + 1, r = l + 1;
    if (l < k && better(hv[worst], hi[worst], hv[l], hi[l])) worst = l;
    if (r < k && better(hv[worst], hi[worst], hv[r], hi[r])) worst = r;
    if (worst == pos) return;
    const T tv = hv[pos];
    hv[pos] = hv[worst];
    hv[worst] = tv;
    const int64_t ti = hi[pos];
    hi[pos] = hi[worst];
    hi[worst] = ti;
    pos = worst;
  }
}

// Sorts a heap best first (heap sort: the root, the worst, goes to the end each round).
template <typename T, class Better>
AECORE_HD void heap_sort_best_first(T* hv, int64_t* hi, int64_t k, Better better) {
  for (int64_t end = k - 1; end > 0; --end) {
    const T tv = hv[0];
    hv[0] = hv[end];
    hv[end] = tv;
    const int64_t ti = hi[0];
    hi[0] = hi[end];
    hi[end] = ti;
    heap_sift_down(hv, hi, end, 0, better);
  }
}

}  // namespace aecore
