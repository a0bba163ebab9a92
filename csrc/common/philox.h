// Philox-4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), shared by the CPU and CUDA kernels. Torch-free on purpose: the
// C++ unit tests and nvcc compile it without torch headers.
//
// Counter layout used by every aecore sampling kernel (so a draw depends only on the
// element it decides, never on threads, tiling or the device):
//   ctr = {column / 4, row, stream, offset}   key = {seed low 32 bits, seed high 32 bits}
// where `stream` numbers the sampling passes within one op call (2*step for hidden
// units, 2*step+1 for visible units) and seed/offset come from a torch.Generator.
// Lane `column % 4` of the four output words decides element (row, column).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AECORE_HD __host__ __device__ __forceinline__
#else
#define AECORE_HD inline
#endif

namespace aecore {

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

AECORE_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

AECORE_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                     uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kM0, c0, hi0, lo0);
  mulhilo(kM1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}
}  // namespace philox_detail

// Ten rounds with the key bumped between rounds, exactly as Random123's philox4x32_R(10).
AECORE_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    round(c0, c1, c2, c3, k0, k1);
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Uniform in [0, 1) from 32 random bits. float keeps the top 24 bits so the value is
// exact and never rounds up to 1; double uses all 32 (Bernoulli decisions need no more).
template <typename T>
AECORE_HD T uniform01(uint32_t x);
template <>
AECORE_HD float uniform01<float>(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;  // 2^-24
}
template <>
AECORE_HD double uniform01<double>(uint32_t x) {
  return static_cast<double>(x) * 2.3283064365386962890625e-10;  // 2^-32
}

// Two standard normals from two words (Box-Muller). u1 lies in (0, 1] so log(u1) is
// finite; the result is exact to the precision of T's log/sin/cos.
template <typename T>
AECORE_HD void box_muller(uint32_t a, uint32_t b, T& z0, T& z1) {
  const T u1 = uniform01<T>(a) + (sizeof(T) == 4 ? T(5.9604644775390625e-08)
                                                  : T(2.3283064365386962890625e-10));
  const T u2 = uniform01<T>(b);
  const T r = std::sqrt(T(-2) * std::log(u1));
  const T theta = T(6.283185307179586476925286766559) * u2;
  z0 = r * std::cos(theta);
  z1 = r * std::sin(theta);
}

// Splits a 64-bit seed into the Philox key.
AECORE_HD void seed_to_key(uint64_t seed, uint32_t& k0, uint32_t& k1) {
  k0 = static_cast<uint32_t>(seed);
  k1 = static_cast<uint32_t>(seed >> 32);
}

}  // namespace aecore
