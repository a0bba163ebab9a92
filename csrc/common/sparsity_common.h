// Scalar pieces of the sparsity penalties shared by the CPU and CUDA kernels (torch-free,
// host and device).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/philox.h"  // AECORE_HD

namespace aecore {

// rho-hat is clamped to [kKlEps, 1 - kKlEps] before the logs, so the penalty stays finite
// for dead (always 0) or saturated (always 1) units. Same constant in reference.py.
constexpr double kKlEps = 1e-6;

// KL(rho || q) with q clamped.
AECORE_HD double kl_term(double rho, double q) {
  const double qc = q < kKlEps ? kKlEps : (q > 1.0 - kKlEps ? 1.0 - kKlEps : q);
  return rho * log(rho / qc) + (1.0 - rho) * log((1.0 - rho) / (1.0 - qc));
}

// d KL / d q; zero where the clamp is active (or q is NaN), as torch.clamp's gradient.
AECORE_HD double kl_dterm(double rho, double q) {
  if (!(q >= kKlEps && q <= 1.0 - kKlEps)) return 0.0;
  return -rho / q + (1.0 - rho) / (1.0 - q);
}

// Total order used by top-k: NaN above everything (as torch.topk), then by value, and
// among equal values the lower index first. True if (a, ia) ranks before (b, ib).
template <typename T>
AECORE_HD bool topk_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

}  // namespace aecore
