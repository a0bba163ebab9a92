// The ATen side of momentum_step_ for the CPU and CUDA backends. `K` provides
//   check_finite<T>(s, n, bool* ok): clears *ok if some s[i] is not finite;
//   momentum_update<T>(p, v, s, n, lr, momentum, weight_decay, const bool* ok): the
//   update, skipped where *ok is false (on CUDA the flag stays on the device: no sync).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

namespace aecore {

template <class K>
at::Tensor momentum_step_impl(at::TensorList params, at::TensorList velocities,
                              at::TensorList steps, double lr, double momentum,
                              at::ArrayRef<double> weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(n >= 1, "aecore: momentum_step_ needs at least one parameter");
  TORCH_CHECK(velocities.size() == n && steps.size() == n && weight_decay.size() == n,
              "aecore: momentum_step_ needs one velocity, step and weight decay per parameter; "
              "got ", n, " parameters, ", velocities.size(), " velocities, ", steps.size(),
              " steps, ", weight_decay.size(), " weight decays");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum),
              "aecore: momentum_step_ needs a finite lr and momentum");
  for (const double w : weight_decay)
    TORCH_CHECK(std::isfinite(w), "aecore: momentum_step_ needs finite weight decays");
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
              "aecore: momentum_step_ needs float32 or float64 tensors, got ",
              first.scalar_type());
  std::vector<at::Tensor> s(n);
  for (size_t i = 0; i < n; ++i) {
    for (const at::Tensor* t : {&params[i], &velocities[i], &steps[i]}) {
      TORCH_CHECK(t->scalar_type() == first.scalar_type() && t->device() == first.device(),
                  "aecore: momentum_step_ tensors must share one dtype and device");
      TORCH_CHECK(t->sizes() == params[i].sizes(), "aecore: momentum_step_ entry ", i,
                  ": parameter, velocity and step shapes differ");
    }
    TORCH_CHECK(params[i].is_contiguous() && velocities[i].is_contiguous(),
                "aecore: momentum_step_ changes parameters and velocities in place: they must "
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

}  // namespace aecore
