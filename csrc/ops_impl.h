// The ATen side of the aecore ops, shared by the CPU and CUDA backends: argument checks
// (a backstop; aecore.ops validates first with friendly messages), output allocation,
// the GEMMs through at::mm / at::addmm (MKL/OpenBLAS or cuBLAS) and calls into the
// torch-free kernels. `K` is the backend (CpuKernels or CudaKernels) with static methods
//   unit_pass<T>(UnitPass<T>),
//   finalize_stats<T>(StatsFinal<T>),
//   kl_forward<T>(h, rows, cols, rho, beta, T* mean, T* loss),
//   kl_backward<T>(const T* grad_loss, const T* grad_mean, mean, rows, cols, rho, beta,
//                  grad_row),
//   topk_forward<T>(z, rows, cols, k, out, idx), topk_backward<T>(g, idx, rows, cols, k, grad).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/check_message.h"
#include "common/unit_pass.h"

namespace aecore {

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  AECORE_CHECK(t.dim() == 2, "aecore: ", name, " must be 2-D, got ", t.dim(), "-D");
  AECORE_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "aecore: ", name,
               " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& t, const char* name) {
  AECORE_CHECK(t.scalar_type() == a.scalar_type(), "aecore: ", name, " has dtype ",
               t.scalar_type(), ", expected ", a.scalar_type());
  AECORE_CHECK(t.device() == a.device(), "aecore: ", name, " is on ", t.device(), ", expected ",
               a.device());
}

template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

using GibbsOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CDOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// k Gibbs steps v -> h -> v, optionally with the CD statistics. Conventions:
// v (B, V), W (V, H), b_v (V), b_h (H), chain (Bc, H) hidden states (PCD) or none (CD,
// the chain starts from the positive-phase sample h0, Bc = B). Units are Bernoulli
// (sigmoid means, 0/1 samples) or unit-variance Gaussian (linear means, mean + N(0, 1)),
// per layer. Noise (optional, exact path): noise_h0 (B, H), noise_h (k, Bc, H),
// noise_v (k, Bc, V): uniforms for Bernoulli units, standard normals for Gaussian ones.
// Philox streams: 0 = positive hidden pass, 2t-1 / 2t = visible / hidden pass of step t.
template <class K>
struct Gibbs {
  at::Tensor ph0, h0, v_k, v_mean, ph_k, h_k;  // chain
  at::Tensor dW, db_v, db_h, recon;           // statistics

  Gibbs(const at::Tensor& v_in, const at::Tensor& W, const at::Tensor& b_v_in,
        const at::Tensor& b_h_in, int64_t k, const std::optional<at::Tensor>& chain_in,
        bool gaussian_visible, bool gaussian_hidden, bool sample_visible,
        const at::Tensor& rng_in,
        const std::optional<at::Tensor>& noise_h0_in, const std::optional<at::Tensor>& noise_h_in,
        const std::optional<at::Tensor>& noise_v_in, bool stats) {
    check_float_matrix(v_in, "v");
    check_float_matrix(W, "W");
    check_same(v_in, W, "W");
    check_same(v_in, b_v_in, "b_v");
    check_same(v_in, b_h_in, "b_h");
    AECORE_CHECK(k >= 1, "aecore: k must be >= 1, got ", k);
    const int64_t B = v_in.size(0), V = v_in.size(1), H = W.size(1);
    AECORE_CHECK(W.size(0) == V, "aecore: W must be (V, H) = (", V, ", H), got ", W.sizes());
    AECORE_CHECK(b_v_in.dim() == 1 && b_v_in.size(0) == V, "aecore: b_v must be (", V, ",)");
    AECORE_CHECK(b_h_in.dim() == 1 && b_h_in.size(0) == H, "aecore: b_h must be (", H, ",)");
    AECORE_CHECK(rng_in.scalar_type() == at::kLong && rng_in.numel() == 2,
                 "aecore: rng must be an int64 tensor {seed, offset}");
    // the kernels read it where they run (CUDA kernels from device memory)
    AECORE_CHECK(rng_in.device() == v_in.device(), "aecore: rng is on ", rng_in.device(),
                 ", expected ", v_in.device());
    const bool pcd = chain_in.has_value();
    if (pcd) {
      check_same(v_in, *chain_in, "chain");
      AECORE_CHECK(chain_in->dim() == 2 && chain_in->size(1) == H, "aecore: chain must be (Bc, ",
                   H, ")");
    }
    const int64_t Bc = pcd ? chain_in->size(0) : B;
    auto noise = [&](const std::optional<at::Tensor>& n, at::IntArrayRef shape,
                     const char* name) -> std::optional<at::Tensor> {
      if (!n.has_value()) return std::nullopt;
      check_same(v_in, *n, name);
      AECORE_CHECK(n->sizes() == shape, "aecore: ", name, " must have shape ", shape, ", got ",
                   n->sizes());
      return n->contiguous();
    };
    const auto nh0 = noise(noise_h0_in, {B, H}, "noise_h0");
    const auto nh = noise(noise_h_in, {k, Bc, H}, "noise_h");
    const auto nv = noise(noise_v_in, {k, Bc, V}, "noise_v");

    const at::Tensor v = v_in.contiguous();
    const at::Tensor b_v = b_v_in.contiguous();
    const at::Tensor b_h = b_h_in.contiguous();
    const at::Tensor rng = rng_in.contiguous();
    const at::Tensor Wt = W.t();
    // The statistics' accumulators, one zeroed double buffer (few small allocations:
    // at RBM sizes like 64x64x256 the per-call overhead is a real part of the time):
    // [sum ph0 (H) | sum ph_k (H) | sum v (V) | sum v_k (V) | sum (v - v_mean)^2 (1)].
    at::Tensor acc;
    if (stats) acc = at::zeros({2 * H + 2 * V + 1}, v.options().dtype(at::kDouble));

    const Unit visible_unit = gaussian_visible ? Unit::Gaussian : Unit::Bernoulli;
    const Unit hidden_unit = gaussian_hidden ? Unit::Gaussian : Unit::Bernoulli;
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "aecore_gibbs", [&] {
      using T = scalar_t;
      double* const a0 = stats ? acc.data_ptr<double>() : nullptr;
      double* const sum_ph0 = stats ? a0 : nullptr;
      double* const sum_phk = stats ? a0 + H : nullptr;
      double* const sum_v = stats ? a0 + 2 * H : nullptr;
      double* const sum_vk = stats ? a0 + 2 * H + V : nullptr;
      double* const sq = stats ? a0 + 2 * H + 2 * V : nullptr;
      // One pass over a GEMM output `x` (rows, cols): the layer's bias, unit, sampling
      // into `state` with `noise` or Philox stream `stream`; accumulators set by caller.
      auto layer_pass = [&](const at::Tensor& x, const at::Tensor& bias, Unit unit, bool sample,
                            T* state, const T* noise, uint32_t stream) {
        UnitPass<T> p;
        p.x = x.data_ptr<T>();
        p.rows = x.size(0);
        p.cols = x.size(1);
        p.bias = bias.data_ptr<T>();
        p.unit = unit;
        p.sample = sample;
        p.state = state;
        p.noise = noise;
        p.rng = rng.data_ptr<int64_t>();
        p.stream = stream;
        return p;
      };
      // positive phase: ph0 = E[h | v], h0 a sample of it (CD only)
      ph0 = at::mm(v, W);
      const bool need_h0 = !(stats && pcd);
      h0 = need_h0 ? at::empty({B, H}, v.options()) : at::Tensor();
      {
        UnitPass<T> p = layer_pass(ph0, b_h, hidden_unit, need_h0,
                                   need_h0 ? h0.data_ptr<T>() : nullptr, opt_ptr<T>(nh0), 0);
        p.colsum_mean = sum_ph0;
        K::template unit_pass<T>(p);
      }
      if (stats && pcd) {
        // PCD's chain does not reconstruct the batch: its monitor is the mean-field
        // reconstruction E[v | ph0], whose error and sum(v) ride along this pass
        at::Tensor vm0 = at::mm(ph0, Wt);
        UnitPass<T> p = layer_pass(vm0, b_v, visible_unit, false, nullptr, nullptr, 0);
        p.data = v.data_ptr<T>();
        p.colsum_data = sum_v;
        p.sq_err = sq;
        K::template unit_pass<T>(p);
      }
      at::Tensor hcur = pcd ? chain_in->contiguous() : h0;
      for (int64_t t = 1; t <= k; ++t) {
        const bool last = t == k;
        // visible pass: mean of v given h, then its state
        at::Tensor vm = at::mm(hcur, Wt);
        at::Tensor vs = at::empty({Bc, V}, v.options());
        {
          const T* noise = nv.has_value() ? opt_ptr<T>(nv) + (t - 1) * Bc * V : nullptr;
          UnitPass<T> p = layer_pass(vm, b_v, visible_unit, sample_visible, vs.data_ptr<T>(),
                                     noise, static_cast<uint32_t>(2 * t - 1));
          if (stats && last) {
            p.colsum_state = sum_vk;
            if (!pcd) {  // the reconstruction error and sum(v) ride along this pass
              p.data = v.data_ptr<T>();
              p.colsum_data = sum_v;
              p.sq_err = sq;
            }
          }
          K::template unit_pass<T>(p);
        }
        // hidden pass
        at::Tensor ph = at::mm(vs, W);
        at::Tensor hs = at::empty({Bc, H}, v.options());
        {
          const T* noise = nh.has_value() ? opt_ptr<T>(nh) + (t - 1) * Bc * H : nullptr;
          UnitPass<T> p = layer_pass(ph, b_h, hidden_unit, true, hs.data_ptr<T>(), noise,
                                     static_cast<uint32_t>(2 * t));
          if (stats && last) p.colsum_mean = sum_phk;
          K::template unit_pass<T>(p);
        }
        hcur = hs;
        if (last) {
          v_k = vs;
          v_mean = vm;
          ph_k = ph;
          h_k = hs;
        }
      }
      if (stats) {
        const double inv_b = 1.0 / static_cast<double>(std::max<int64_t>(B, 1));
        const double inv_bc = 1.0 / static_cast<double>(std::max<int64_t>(Bc, 1));
        // dW = v^T ph0 / B - v_k^T ph_k / Bc: two BLAS calls, the second accumulating.
        dW = at::mm(v.t(), ph0);
        dW.addmm_(v_k.t(), ph_k, /*beta=*/inv_b, /*alpha=*/-inv_bc);
        db_v = at::empty({V}, v.options());
        db_h = at::empty({H}, v.options());
        recon = at::empty({}, v.options());
        StatsFinal<T> f;
        f.acc = a0;
        f.V = V;
        f.H = H;
        f.inv_b = inv_b;
        f.inv_bc = inv_bc;
        f.db_v = db_v.data_ptr<T>();
        f.db_h = db_h.data_ptr<T>();
        f.recon = recon.data_ptr<T>();
        K::template finalize_stats<T>(f);
      }
    });
  }
};

template <class K>
GibbsOut gibbs_chain_impl(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                          const at::Tensor& b_h, int64_t k, bool gaussian_visible,
                          bool gaussian_hidden, bool sample_visible, const at::Tensor& rng,
                          const std::optional<at::Tensor>& noise_h0,
                          const std::optional<at::Tensor>& noise_h,
                          const std::optional<at::Tensor>& noise_v) {
  Gibbs<K> g(v, W, b_v, b_h, k, std::nullopt, gaussian_visible, gaussian_hidden,
             sample_visible, rng, noise_h0, noise_h, noise_v, /*stats=*/false);
  return {g.ph0, g.h0, g.v_k, g.v_mean, g.ph_k, g.h_k};
}

template <class K>
CDOut cd_step_impl(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                   const at::Tensor& b_h, int64_t k, const std::optional<at::Tensor>& chain,
                   bool gaussian_visible, bool gaussian_hidden, bool sample_visible,
                   const at::Tensor& rng, const std::optional<at::Tensor>& noise_h0,
                   const std::optional<at::Tensor>& noise_h,
                   const std::optional<at::Tensor>& noise_v) {
  Gibbs<K> g(v, W, b_v, b_h, k, chain, gaussian_visible, gaussian_hidden, sample_visible, rng,
             noise_h0, noise_h, noise_v, /*stats=*/true);
  return {g.dW, g.db_v, g.db_h, g.h_k, g.recon};
}

template <class K>
std::tuple<at::Tensor, at::Tensor> kl_sparsity_impl(const at::Tensor& h_in, double rho,
                                                    double beta) {
  check_float_matrix(h_in, "h");
  AECORE_CHECK(h_in.size(0) >= 1, "aecore: kl_sparsity needs at least one row");
  AECORE_CHECK(rho > 0.0 && rho < 1.0, "aecore: rho must lie in (0, 1), got ", rho);
  AECORE_CHECK(beta >= 0.0 && std::isfinite(beta), "aecore: beta must be finite and >= 0, got ",
               beta);
  const at::Tensor h = h_in.contiguous();
  at::Tensor mean = at::empty({h.size(1)}, h.options());
  at::Tensor loss = at::empty({}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "aecore_kl_sparsity", [&] {
    K::template kl_forward<scalar_t>(h.data_ptr<scalar_t>(), h.size(0), h.size(1), rho, beta,
                                     mean.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>());
  });
  return {loss, mean};
}

template <class K>
at::Tensor kl_sparsity_backward_impl(const at::Tensor& grad_loss_in,
                                     const std::optional<at::Tensor>& grad_mean_in,
                                     const at::Tensor& mean_in, int64_t rows, double rho,
                                     double beta) {
  AECORE_CHECK(mean_in.dim() == 1, "aecore: mean must be 1-D");
  AECORE_CHECK(grad_loss_in.numel() == 1, "aecore: grad_loss must be a scalar");
  check_same(mean_in, grad_loss_in, "grad_loss");
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  std::optional<at::Tensor> grad_mean;
  if (grad_mean_in.has_value()) {
    check_same(mean_in, *grad_mean_in, "grad_mean");
    AECORE_CHECK(grad_mean_in->dim() == 1 && grad_mean_in->size(0) == mean_in.size(0),
                 "aecore: grad_mean must be (", mean_in.size(0), "), got ", grad_mean_in->sizes());
    grad_mean = grad_mean_in->contiguous();
  }
  AECORE_CHECK(rows >= 1, "aecore: rows must be >= 1, got ", rows);
  // one row: the gradient of every row of h (the caller broadcasts it)
  at::Tensor grad = at::empty({mean.size(0)}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "aecore_kl_sparsity_backward", [&] {
    K::template kl_backward<scalar_t>(grad_loss.data_ptr<scalar_t>(), opt_ptr<scalar_t>(grad_mean),
                                      mean.data_ptr<scalar_t>(), rows, mean.size(0), rho, beta,
                                      grad.data_ptr<scalar_t>());
  });
  return grad;
}

// Indices from a caller of the raw ops (the kernels' own are in range): one outside
// [0, n) would read or write outside its tensor. The CPU counts them in one pass; CUDA
// asserts on the device (no host sync: an index out of range stops the stream's kernels
// with this message instead).
inline void check_index_range(const at::Tensor& indices, int64_t n) {
  if (indices.numel() == 0) return;
  if (indices.is_cpu()) {
    const at::Tensor idx = indices.contiguous();
    const int64_t* p = idx.data_ptr<int64_t>();
    int64_t bad = 0, lo = p[0], hi = p[0];  // a count, so that the loop vectorises
    for (int64_t i = 0; i < idx.numel(); ++i) {
      bad += (p[i] < 0) | (p[i] >= n);
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    AECORE_CHECK(bad == 0, "aecore: indices must lie in [0, ", n, "); ", bad,
                 " do not (values in [", lo, ", ", hi, "])");
  } else {
    at::_assert_async(at::logical_and(indices.ge(0), indices.lt(n)).all(),
                      "aecore: indices must lie in [0, " + std::to_string(n) + ")");
  }
}

template <class K>
std::tuple<at::Tensor, at::Tensor> topk_sparsify_impl(const at::Tensor& z_in, int64_t k) {
  check_float_matrix(z_in, "z");
  AECORE_CHECK(k >= 1 && k <= z_in.size(1), "aecore: k must lie in [1, ", z_in.size(1), "], got ",
               k);
  const at::Tensor z = z_in.contiguous();
  at::Tensor out = at::empty_like(z);
  at::Tensor idx = at::empty({z.size(0), k}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "aecore_topk_sparsify", [&] {
    K::template topk_forward<scalar_t>(z.data_ptr<scalar_t>(), z.size(0), z.size(1), k,
                                       out.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
  });
  return {out, idx};
}

template <class K>
at::Tensor topk_sparsify_backward_impl(const at::Tensor& grad_out_in, const at::Tensor& idx_in) {
  check_float_matrix(grad_out_in, "grad_out");
  AECORE_CHECK(idx_in.scalar_type() == at::kLong && idx_in.dim() == 2 &&
                   idx_in.size(0) == grad_out_in.size(0),
               "aecore: indices must be int64 (B, k)");
  AECORE_CHECK(idx_in.device() == grad_out_in.device(), "aecore: indices on the wrong device");
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor idx = idx_in.contiguous();
  check_index_range(idx, g.size(1));
  at::Tensor grad = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "aecore_topk_sparsify_backward", [&] {
    K::template topk_backward<scalar_t>(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), g.size(0),
                                        g.size(1), idx.size(1), grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace aecore
