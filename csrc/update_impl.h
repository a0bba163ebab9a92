// The ATen side of momentum_step_ for the CPU and CUDA backends. `K` provides
//   check_finite<T>(s, n, bool* ok): clears *ok if some s[i] is not finite;
//   momentum_update<T>(p, v, s, n, lr, momentum, weight_decay, const bool* ok): the
//   update, skipped where *ok is false (on CUDA the flag stays on the device: no sync).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "ops_impl.h"

namespace aecore {

// The update, its checks' messages naming the op `op` that asked for it.
template <class K>
at::Tensor momentum_update_checked(at::TensorList params, at::TensorList velocities,
                                   at::TensorList steps, double lr, double momentum,
                                   at::ArrayRef<double> weight_decay, const char* op) {
  const size_t n = params.size();
  AECORE_CHECK(n >= 1, "aecore: ", op, " needs at least one parameter");
  AECORE_CHECK(velocities.size() == n && steps.size() == n && weight_decay.size() == n,
               "aecore: ", op, " needs one velocity, step and weight decay per parameter; "
               "got ", n, " parameters, ", velocities.size(), " velocities, ", steps.size(),
               " steps, ", weight_decay.size(), " weight decays");
  AECORE_CHECK(std::isfinite(lr) && std::isfinite(momentum),
               "aecore: ", op, " needs a finite lr and momentum");
  for (const double w : weight_decay)
    AECORE_CHECK(std::isfinite(w), "aecore: ", op, " needs finite weight decays");
  const at::Tensor& first = params[0];
  AECORE_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
               "aecore: ", op, " needs float32 or float64 tensors, got ",
               first.scalar_type());
  std::vector<at::Tensor> s(n);
  for (size_t i = 0; i < n; ++i) {
    for (const at::Tensor* t : {&params[i], &velocities[i], &steps[i]}) {
      AECORE_CHECK(t->scalar_type() == first.scalar_type() && t->device() == first.device(),
                   "aecore: ", op, " tensors must share one dtype and device");
      AECORE_CHECK(t->sizes() == params[i].sizes(), "aecore: ", op, " entry ", i,
                   ": parameter, velocity and step shapes differ");
    }
    AECORE_CHECK(params[i].is_contiguous() && velocities[i].is_contiguous(),
                 "aecore: ", op, " changes parameters and velocities in place: they must "
                 "be contiguous");
    s[i] = steps[i].contiguous();
  }
  at::Tensor ok = at::ones({}, first.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "aecore_momentum_step", [&] {
    bool* flag = ok.data_ptr<bool>();
    for (size_t i = 0; i < n; ++i)
      K::template check_finite<scalar_t>(s[i].data_ptr<scalar_t>(), s[i].numel(), flag);
    for (size_t i = 0; i < n; ++i)
      K::template momentum_update<scalar_t>(
          params[i].data_ptr<scalar_t>(), velocities[i].data_ptr<scalar_t>(),
          s[i].data_ptr<scalar_t>(), params[i].numel(), static_cast<scalar_t>(lr),
          static_cast<scalar_t>(momentum), static_cast<scalar_t>(weight_decay[i]), flag);
  });
  return ok;
}

template <class K>
at::Tensor momentum_step_impl(at::TensorList params, at::TensorList velocities,
                              at::TensorList steps, double lr, double momentum,
                              at::ArrayRef<double> weight_decay) {
  return momentum_update_checked<K>(params, velocities, steps, lr, momentum, weight_decay,
                                    "momentum_step_");
}

// One CD-k / PCD-k training step in place: cd_step's statistics, then momentum_step_'s
// update of (W, b_v, b_h) with weight decay on W alone, then (PCD) the chain advanced;
// nothing changes unless every statistic is finite. One call instead of two ops and
// the tensors between them: at RBM sizes a call's overhead is a real part of a step.
// Returns (recon_error, applied), as cd_step and momentum_step_ do.
template <class K>
std::tuple<at::Tensor, at::Tensor> cd_update_impl(
    const at::Tensor& v, at::Tensor& W, at::Tensor& b_v, at::Tensor& b_h, at::Tensor& velocity_W,
    at::Tensor& velocity_b_v, at::Tensor& velocity_b_h, int64_t k,
    const std::optional<at::Tensor>& chain, bool gaussian_visible, bool gaussian_hidden,
    bool sample_visible, const at::Tensor& rng, double lr, double momentum, double weight_decay,
    const std::optional<at::Tensor>& noise_h0, const std::optional<at::Tensor>& noise_h,
    const std::optional<at::Tensor>& noise_v) {
  // checked before anything changes: the chain is written last
  if (chain.has_value()) at::assert_no_internal_overlap(*chain);
  Gibbs<K> g(v, W, b_v, b_h, k, chain, gaussian_visible, gaussian_hidden, sample_visible, rng,
             noise_h0, noise_h, noise_v, /*stats=*/true);
  const std::vector<double> decay = {weight_decay, 0.0, 0.0};
  at::Tensor applied =
      momentum_update_checked<K>({W, b_v, b_h}, {velocity_W, velocity_b_v, velocity_b_h},
                                 {g.dW, g.db_v, g.db_h}, lr, momentum, decay, "cd_update_");
  if (chain.has_value()) {
    at::Tensor state = *chain;  // shares the caller's storage
    if (applied.is_cpu()) {
      if (applied.item<bool>()) state.copy_(g.h_k);
    } else {  // the flag stays on the device: no host sync
      state.copy_(at::where(applied, g.h_k, state));
    }
  }
  return {g.recon, applied};
}

}  // namespace aecore
