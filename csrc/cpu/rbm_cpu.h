// Torch-free CPU kernels for RBM Gibbs sampling: the one pass over a GEMM output that
// adds the bias, applies the unit's mean function, draws the sample from Philox and
// accumulates the column sums CD needs. Raw pointers, OpenMP over rows, inner loops
// written so that GCC vectorises them (no branches, no calls into libm for float).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <dirent.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/philox.h"
#include "common/unit_pass.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace aecore {
namespace cpu {

// exp for float with ~2 ulp error, branch-free so that a loop over it vectorises
// (glibc's expf is a scalar call per element and would dominate the pass). Cephes
// range reduction and polynomial; inputs are clamped to the finite range. Needs
// -fno-trapping-math to vectorise (the selects must not be kept as branches).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const float nf = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const int n = static_cast<int>(nf);
  const float r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline int num_threads_for(int64_t work) {
#ifdef _OPENMP
  // Below ~32k elements a parallel region costs more than it saves.
  return work < 32768 ? 1 : omp_get_max_threads();
#else
  (void)work;
  return 1;
#endif
}

#if defined(__linux__) && defined(_OPENMP)
// Runnable threads of this process (state R in /proc/self/task/*/stat): the caller and
// the thread pools that still spin after their last parallel region.
inline int own_running_threads() {
  int running = 0;
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return 1;
  while (const dirent* entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/task/%s/stat", entry->d_name);
    if (std::FILE* f = std::fopen(path, "r")) {
      char buf[512];
      const size_t got = std::fread(buf, 1, sizeof(buf) - 1, f);
      std::fclose(f);
      buf[got] = 0;
      // "tid (comm) S ...": the state follows the last ')' (comm may hold one)
      const char* close = std::strrchr(buf, ')');
      if (close != nullptr && close[1] == ' ' && close[2] == 'R') ++running;
    }
  }
  closedir(dir);
  return running > 0 ? running : 1;
}
#endif

// Cores not taken by other processes' runnable threads (Linux: /proc/loadavg's count of
// runnable threads less this process's own), re-read at most every 20 ms; elsewhere, all.
inline int free_cores() {
#if defined(__linux__) && defined(_OPENMP)
  static std::atomic<int64_t> next_read_ns{0};
  static std::atomic<int> cached{1 << 30};
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  if (now >= next_read_ns.load(std::memory_order_relaxed)) {
    next_read_ns.store(now + 20'000'000, std::memory_order_relaxed);
    int running = 0;
    if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
      if (std::fscanf(f, "%*f %*f %*f %d", &running) != 1) running = 0;
      std::fclose(f);
    }
    const int others = std::max(0, running - own_running_threads());
    cached.store(running > 0 ? std::max(1, omp_get_num_procs() - others) : (1 << 30),
                 std::memory_order_relaxed);
  }
  return cached.load(std::memory_order_relaxed);
#else
  return 1 << 30;
#endif
}

// Threads for a pass whose result does not depend on the thread count (each row or
// column computed by one thread): as num_threads_for, but no more than the free cores.
// Beside another process that keeps the cores busy, an OpenMP team waits for a
// descheduled member at its barrier for a scheduler time slice (milliseconds, against
// microseconds of work), so such passes then run on fewer threads, or the caller's own.
inline int threads_now(int64_t work) {
  const int nt = num_threads_for(work);
  return nt > 1 ? std::min(nt, free_cores()) : nt;
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Rows [r0, r1) of `rows` split evenly over `nt` threads.
inline void row_range(int64_t rows, int nt, int tid, int64_t& r0, int64_t& r1) {
  const int64_t chunk = (rows + nt - 1) / nt;
  r0 = std::min<int64_t>(rows, tid * chunk);
  r1 = std::min<int64_t>(rows, r0 + chunk);
}

namespace detail {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AECORE_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), unused))
#else
#define AECORE_CLONES __attribute__((unused))
#endif


constexpr int64_t kChunk = 256;  // columns per Philox batch (multiple of 4)

// Philox words for columns [c0, c0 + n) of `row` (c0 a multiple of 4, n <= kChunk):
// out[4g + l] = lane l of philox(ctr = {c0/4 + g, row, stream, offset}). Portable
// version: the counters are kept as four arrays (structure of arrays) and the rounds run
// across all groups at once, so that the compiler can vectorise it.
static inline void philox_words_portable(uint32_t* out, int64_t row, int64_t c0, int64_t n,
                                         uint32_t k0, uint32_t k1, uint32_t stream,
                                         uint32_t offset) {
  constexpr int L = kChunk / 4;
  alignas(64) uint32_t x0[L], x1[L], x2[L], x3[L];
  const uint32_t g0 = static_cast<uint32_t>(c0 / 4);
  for (int g = 0; g < L; ++g) {
    x0[g] = g0 + static_cast<uint32_t>(g);
    x1[g] = static_cast<uint32_t>(row);
    x2[g] = stream;
    x3[g] = offset;
  }
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      ka += philox_detail::kW0;
      kb += philox_detail::kW1;
    }
    for (int g = 0; g < L; ++g) {
      const uint64_t p0 = static_cast<uint64_t>(philox_detail::kM0) * x0[g];
      const uint64_t p1 = static_cast<uint64_t>(philox_detail::kM1) * x2[g];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[g] ^ ka;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[g] ^ kb;
      x0[g] = n0;
      x1[g] = static_cast<uint32_t>(p1);
      x2[g] = n2;
      x3[g] = static_cast<uint32_t>(p0);
    }
  }
  const int64_t ng = (n + 3) / 4;
  for (int64_t g = 0; g < ng; ++g) {
    out[4 * g + 0] = x0[g];
    out[4 * g + 1] = x1[g];
    out[4 * g + 2] = x2[g];
    out[4 * g + 3] = x3[g];
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define AECORE_PHILOX_SIMD 1
// AVX-512 / AVX2 versions: 16 / 8 counters per vector. There is no packed 32x32->high-32
// multiply, so the high halves come from two widening multiplies (even and odd lanes)
// and a blend. Picked at run time from the CPU's features (see philox_words).
#define AECORE_PHILOX_BODY(VEC, W, SET1, ADD, XOR, MULLO, MULHI, STORE, IOTA)                \
  constexpr int L = kChunk / 4;                                                             \
  alignas(64) uint32_t a0[L], a1[L], a2[L], a3[L];                                          \
  const uint32_t g0 = static_cast<uint32_t>(c0 / 4);                                        \
  const int64_t ng = (n + 3) / 4;                                                           \
  const VEC m0 = SET1(static_cast<int>(philox_detail::kM0));                                \
  const VEC m1 = SET1(static_cast<int>(philox_detail::kM1));                                \
  for (int64_t b = 0; b < ng; b += W) {                                                     \
    VEC x0 = ADD(SET1(static_cast<int>(g0 + static_cast<uint32_t>(b))), IOTA);              \
    VEC x1 = SET1(static_cast<int>(row));                                                   \
    VEC x2 = SET1(static_cast<int>(stream));                                                \
    VEC x3 = SET1(static_cast<int>(offset));                                                \
    uint32_t ka = k0, kb = k1;                                                              \
    for (int r = 0; r < 10; ++r) {                                                          \
      if (r > 0) {                                                                          \
        ka += philox_detail::kW0;                                                           \
        kb += philox_detail::kW1;                                                           \
      }                                                                                     \
      const VEC lo0 = MULLO(m0, x0), hi0 = MULHI(m0, x0);                                   \
      const VEC lo1 = MULLO(m1, x2), hi1 = MULHI(m1, x2);                                   \
      x0 = XOR(XOR(hi1, x1), SET1(static_cast<int>(ka)));                                   \
      x2 = XOR(XOR(hi0, x3), SET1(static_cast<int>(kb)));                                   \
      x1 = lo1;                                                                             \
      x3 = lo0;                                                                             \
    }                                                                                       \
    STORE(a0 + b, x0);                                                                      \
    STORE(a1 + b, x1);                                                                      \
    STORE(a2 + b, x2);                                                                      \
    STORE(a3 + b, x3);                                                                      \
  }                                                                                         \
  for (int64_t g = 0; g < ng; ++g) {                                                        \
    out[4 * g + 0] = a0[g];                                                                 \
    out[4 * g + 1] = a1[g];                                                                 \
    out[4 * g + 2] = a2[g];                                                                 \
    out[4 * g + 3] = a3[g];                                                                 \
  }

// GCC 12 flags the intrinsics' internal _mm512_undefined_epi32() (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) static inline __m512i mulhi_avx512(__m512i a, __m512i b) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}
__attribute__((target("avx512f"))) static void philox_words_avx512(
    uint32_t* out, int64_t row, int64_t c0, int64_t n, uint32_t k0, uint32_t k1,
    uint32_t stream, uint32_t offset) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto store = [](uint32_t* p, __m512i v) __attribute__((target("avx512f"))) {
    _mm512_store_si512(reinterpret_cast<__m512i*>(p), v);
  };
  AECORE_PHILOX_BODY(__m512i, 16, _mm512_set1_epi32, _mm512_add_epi32, _mm512_xor_si512,
                     _mm512_mullo_epi32, mulhi_avx512, store, iota)
}

__attribute__((target("avx2"))) static inline __m256i mulhi_avx2(__m256i a, __m256i b) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  return _mm256_blend_epi32(even, odd, 0xAA);
}
__attribute__((target("avx2"))) static void philox_words_avx2(uint32_t* out, int64_t row,
                                                               int64_t c0, int64_t n, uint32_t k0,
                                                               uint32_t k1, uint32_t stream,
                                                               uint32_t offset) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto store = [](uint32_t* p, __m256i v) __attribute__((target("avx2"))) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(p), v);
  };
  AECORE_PHILOX_BODY(__m256i, 8, _mm256_set1_epi32, _mm256_add_epi32, _mm256_xor_si256,
                     _mm256_mullo_epi32, mulhi_avx2, store, iota)
}
#pragma GCC diagnostic pop
#undef AECORE_PHILOX_BODY
#endif

// Philox words for columns [c0, c0 + n) of `row`; see philox_words_portable. Uses the
// widest SIMD the CPU has (checked once); every version gives the same words.
static inline void philox_words(uint32_t* out, int64_t row, int64_t c0, int64_t n, uint32_t k0,
                                uint32_t k1, uint32_t stream, uint32_t offset) {
#ifdef AECORE_PHILOX_SIMD
  static const int level = __builtin_cpu_supports("avx512f") ? 2
                           : __builtin_cpu_supports("avx2")  ? 1
                                                             : 0;
  if (level == 2) return philox_words_avx512(out, row, c0, n, k0, k1, stream, offset);
  if (level == 1) return philox_words_avx2(out, row, c0, n, k0, k1, stream, offset);
#endif
  philox_words_portable(out, row, c0, n, k0, k1, stream, offset);
}

template <typename T>
__attribute__((always_inline)) inline void pass_rows_impl(const UnitPass<T>& a, int64_t r0,
                                                          int64_t r1, double* acc_mean,
                                                          double* acc_state, double* acc_data,
                                                          double& sq) {
  const int64_t C = a.cols;
  uint32_t k0 = 0, k1 = 0, offset = 0;
  if (a.sample && !a.noise) {
    seed_to_key(static_cast<uint64_t>(a.rng[0]), k0, k1);
    offset = static_cast<uint32_t>(a.rng[1]);
  }
  alignas(64) uint32_t words[kChunk];
  alignas(64) T normals[kChunk];
  for (int64_t i = r0; i < r1; ++i) {
    T* __restrict__ x = a.x + i * C;
    const T* __restrict__ b = a.bias;
    // 1) bias + mean function, in place (vectorised).
    if (a.unit == Unit::Bernoulli) {
      for (int64_t j = 0; j < C; ++j) x[j] = sigmoid(x[j] + b[j]);
    } else {
      for (int64_t j = 0; j < C; ++j) x[j] = x[j] + b[j];
    }
    if (acc_mean)
      for (int64_t j = 0; j < C; ++j) acc_mean[j] += static_cast<double>(x[j]);
    if (a.data) {
      const T* __restrict__ d = a.data + i * C;
      for (int64_t j = 0; j < C; ++j) acc_data[j] += static_cast<double>(d[j]);
      // eight running sums, one per lane, so that the loop vectorises (a single sum
      // would be a serial chain of scalar adds); the order is fixed by C alone
      double lanes[8] = {};
      int64_t j = 0;
      for (; j + 8 <= C; j += 8)
        for (int l = 0; l < 8; ++l) {
          const double e = static_cast<double>(d[j + l]) - static_cast<double>(x[j + l]);
          lanes[l] += e * e;
        }
      for (; j < C; ++j) {
        const double e = static_cast<double>(d[j]) - static_cast<double>(x[j]);
        lanes[0] += e * e;
      }
      double s = 0.0;
      for (int l = 0; l < 8; ++l) s += lanes[l];
      sq += s;
    }
    // 2) the state: sample or mean, chunk by chunk so Philox words stay in L1.
    if (!a.state) continue;
    T* __restrict__ st = a.state + i * C;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      if (!a.sample) {
        for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j];
      } else if (a.unit == Unit::Bernoulli) {
        if (a.noise) {
          const T* __restrict__ u = a.noise + i * C + c0;
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = u[j] < x[c0 + j] ? T(1) : T(0);
        } else {
          philox_words(words, i, c0, n, k0, k1, a.stream, offset);
          for (int64_t j = 0; j < n; ++j)
            st[c0 + j] = uniform01<T>(words[j]) < x[c0 + j] ? T(1) : T(0);
        }
      } else {
        if (a.noise) {
          const T* __restrict__ z = a.noise + i * C + c0;
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j] + z[j];
        } else {
          philox_words(words, i, c0, n, k0, k1, a.stream, offset);
          for (int64_t j = 0; j < n; j += 2)  // words are filled to a multiple of 4
            box_muller<T>(words[j], words[j + 1], normals[j], normals[j + 1]);
          for (int64_t j = 0; j < n; ++j) st[c0 + j] = x[c0 + j] + normals[j];
        }
      }
    }
    if (acc_state)
      for (int64_t j = 0; j < C; ++j) acc_state[j] += static_cast<double>(st[j]);
  }
}

// Non-template entry points so that target_clones can compile the pass for AVX2 and
// AVX-512 too (picked at load time); the default clone is baseline x86-64.
AECORE_CLONES static void pass_rows(const UnitPass<float>& a, int64_t r0, int64_t r1,
                                    double* acc_mean, double* acc_state, double* acc_data,
                                    double& sq) {
  pass_rows_impl<float>(a, r0, r1, acc_mean, acc_state, acc_data, sq);
}
AECORE_CLONES static void pass_rows(const UnitPass<double>& a, int64_t r0, int64_t r1,
                                    double* acc_mean, double* acc_state, double* acc_data,
                                    double& sq) {
  pass_rows_impl<double>(a, r0, r1, acc_mean, acc_state, acc_data, sq);
}

}  // namespace detail

// Runs the pass over all rows with OpenMP. Each thread owns a block of rows and private
// accumulators, reduced in thread order afterwards, so for a given thread count the sums
// are deterministic; the samples never depend on the thread count (Philox counters are
// per element).
template <typename T>
void unit_pass(const UnitPass<T>& a) {
  const int64_t C = a.cols;
  if (a.rows == 0 || C == 0) return;
  const int nt = num_threads_for(a.rows * C);
  const int n_acc = 3;
  std::vector<double> acc(static_cast<size_t>(nt) * n_acc * C, 0.0);
  std::vector<double> sq(static_cast<size_t>(nt), 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = nt > 1 ? thread_id() : 0;
    int64_t r0, r1;
    row_range(a.rows, nt, tid, r0, r1);
    double* base = acc.data() + static_cast<size_t>(tid) * n_acc * C;
    detail::pass_rows(a, r0, r1, a.colsum_mean ? base : nullptr,
                      a.colsum_state ? base + C : nullptr, a.data ? base + 2 * C : nullptr,
                      sq[tid]);
  }
  for (int t = 0; t < nt; ++t) {
    const double* base = acc.data() + static_cast<size_t>(t) * n_acc * C;
    if (a.colsum_mean)
      for (int64_t j = 0; j < C; ++j) a.colsum_mean[j] += base[j];
    if (a.colsum_state)
      for (int64_t j = 0; j < C; ++j) a.colsum_state[j] += base[C + j];
    if (a.colsum_data)
      for (int64_t j = 0; j < C; ++j) a.colsum_data[j] += base[2 * C + j];
    if (a.sq_err) *a.sq_err += sq[t];
  }
}

namespace detail {

// Rows [r0, r1) summed into s (double): blocks of 32 rows are summed in T (full-width
// SIMD, no conversions; 32 terms keep float error ~1e-6 relative), then added to s. A
// block is walked row after row over a tile of columns (kColumnTile values, the sums in
// an L1-resident buffer), four rows an add: reading each row in order lets the hardware
// prefetcher stream h, where a few columns of all 32 rows at a time (in registers) jump
// a row's length per load and run at half the speed.
constexpr int64_t kColumnTile = 2048;
template <typename T>
__attribute__((always_inline)) inline void column_sums_impl(const T* x, int64_t r0, int64_t r1,
                                                            int64_t cols, T* blk, double* s) {
  for (int64_t b0 = r0; b0 < r1; b0 += 32) {
    const int64_t b1 = std::min(r1, b0 + 32);
    for (int64_t c0 = 0; c0 < cols; c0 += kColumnTile) {
      const int64_t n = std::min(kColumnTile, cols - c0);
      T* __restrict__ bk = blk;
      const T* __restrict__ x0 = x + b0 * cols + c0;
      for (int64_t j = 0; j < n; ++j) bk[j] = x0[j];
      int64_t i = b0 + 1;
      for (; i + 4 <= b1; i += 4) {
        const T* __restrict__ p = x + i * cols + c0;
        const T* __restrict__ q = p + cols;
        const T* __restrict__ u = q + cols;
        const T* __restrict__ w = u + cols;
        for (int64_t j = 0; j < n; ++j) bk[j] += (p[j] + q[j]) + (u[j] + w[j]);
      }
      for (; i < b1; ++i) {
        const T* __restrict__ xi = x + i * cols + c0;
        for (int64_t j = 0; j < n; ++j) bk[j] += xi[j];
      }
      double* __restrict__ sd = s + c0;
      for (int64_t j = 0; j < n; ++j) sd[j] += static_cast<double>(bk[j]);
    }
  }
}
AECORE_CLONES static void column_sums_rows(const float* x, int64_t r0, int64_t r1, int64_t cols,
                                           float* blk, double* s) {
  column_sums_impl<float>(x, r0, r1, cols, blk, s);
}
AECORE_CLONES static void column_sums_rows(const double* x, int64_t r0, int64_t r1,
                                           int64_t cols, double* blk, double* s) {
  column_sums_impl<double>(x, r0, r1, cols, blk, s);
}

}  // namespace detail

// out[j] += sum_i x[i, j] for a (rows, cols) row-major matrix, accumulated in double.
template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, double* out) {
  if (rows == 0 || cols == 0) return;
  const int nt = num_threads_for(rows * cols);
  std::vector<double> acc(static_cast<size_t>(nt) * cols, 0.0);
  const int64_t tile = std::min(cols, detail::kColumnTile);
  std::vector<T> blk(static_cast<size_t>(nt) * tile);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = nt > 1 ? thread_id() : 0;
    int64_t r0, r1;
    row_range(rows, nt, tid, r0, r1);
    detail::column_sums_rows(x, r0, r1, cols, blk.data() + static_cast<size_t>(tid) * tile,
                             acc.data() + static_cast<size_t>(tid) * cols);
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < cols; ++j) out[j] += acc[static_cast<size_t>(t) * cols + j];
}

}  // namespace cpu
}  // namespace aecore
