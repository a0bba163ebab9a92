// The ATen side of the sparse SAE ops: checks (a backstop; aecore.ops validates first),
// outputs, the encoder's tiled GEMMs, and calls into the backend's torch-free kernels.
// `K` has kHalfTypes (whether it takes half and bfloat16 too), kMaxK (the largest k of
// its streaming top-k) and static methods, with A the accumulation type (float; double
// for double):
//   gather_sum<T>(values, idx, rows, m, W, d, bias|null, out),
//   dots<T>(g, idx, rows, m, W, d, out),
//   accumulate<T>(values, idx, rows, m, src, d, n, grad_W, grad_b|null),
//   heap_init<T>(rows, k, A* hv, hi),
//   merge_tile<T>(pre, rows, cols, col0, b, k, A* hv, hi, int* bad) -> false on a NaN / infinity
//     (or it sets the device flag *bad), heap_finish<T>(rows, k, A* hv, hi, T* values).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "ops_impl.h"

namespace aecore {

template <typename T>
using SaeAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Runs f.template operator()<T>() for the tensor type T: float and double, and half and
// bfloat16 where the backend takes them. (The dispatch macros want a literal name.)
template <class K, typename F>
void dispatch_sae(at::ScalarType type, F&& f) {
  if constexpr (K::kHalfTypes) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "aecore_sae_op",
                                    [&] { f.template operator()<scalar_t>(); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(type, "aecore_sae_op", [&] { f.template operator()<scalar_t>(); });
  }
}

template <class K>
void check_sae_matrix(const at::Tensor& t, const char* name) {
  AECORE_CHECK(t.dim() == 2, "aecore: ", name, " must be 2-D, got ", t.dim(), "-D");
  const auto s = t.scalar_type();
  const bool half = s == at::kHalf || s == at::kBFloat16;
  AECORE_CHECK(s == at::kFloat || s == at::kDouble || (K::kHalfTypes && half), "aecore: ", name,
               " must be float32 or float64", K::kHalfTypes ? " (or float16 / bfloat16)" : "",
               ", got ", s);
}

inline void check_vector(const at::Tensor& ref, const at::Tensor& t, const char* name,
                         int64_t size) {
  check_same(ref, t, name);
  AECORE_CHECK(t.dim() == 1 && t.size(0) == size, "aecore: ", name, " must be (", size,
               ",), got ", t.sizes());
}

// values (B, m) float, indices (B, m) int64 in [0, n), on values' device. aecore.ops
// checks the range for every device (outside torch.compile); here it is checked again
// (check_index_range), for callers of the raw ops and compiled graphs.
template <class K>
void check_code(const at::Tensor& values, const at::Tensor& indices, int64_t n) {
  check_sae_matrix<K>(values, "values");
  AECORE_CHECK(indices.scalar_type() == at::kLong && indices.sizes() == values.sizes(),
               "aecore: indices must be int64 of the values' shape ", values.sizes(), ", got ",
               indices.scalar_type(), " ", indices.sizes());
  AECORE_CHECK(indices.device() == values.device(), "aecore: indices are on ", indices.device(),
               ", expected ", values.device());
  check_index_range(indices, n);
}

// Latents per GEMM tile: the (B, tile) pre-activation buffer stays near 16 MB of floats.
inline int64_t encoder_tile(int64_t rows, int64_t n) {
  const int64_t target = (int64_t(1) << 22) / std::max<int64_t>(rows, 1);
  const int64_t tile = std::max<int64_t>(256, target / 64 * 64);
  return std::min(tile, n);
}

using TopkCode = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Each row's k largest pre-activations and, with aux_k > 0, its aux_k largest among the
// latents `dead` marks (AuxK's), both from the same tiles: the second selection costs a
// merge over the dead columns, not a second GEMM.
template <class K>
TopkCode topk_encode_impl(const at::Tensor& x_in, const at::Tensor& W_in,
                          const at::Tensor& b_enc_in, const at::Tensor& b_dec_in, int64_t k,
                          int64_t aux_k, const std::optional<at::Tensor>& dead_in,
                          bool check_finite) {
  check_sae_matrix<K>(x_in, "x");
  check_sae_matrix<K>(W_in, "W_enc");
  check_same(x_in, W_in, "W_enc");
  const int64_t B = x_in.size(0), d = x_in.size(1), n = W_in.size(0);
  AECORE_CHECK(W_in.size(1) == d, "aecore: W_enc must be (n, ", d, "), got ", W_in.sizes());
  check_vector(x_in, b_enc_in, "b_enc", n);
  check_vector(x_in, b_dec_in, "b_dec", d);
  AECORE_CHECK(k >= 1 && k <= n, "aecore: k must lie in [1, ", n, "], got ", k);
  AECORE_CHECK(aux_k >= 0 && aux_k <= n, "aecore: aux_k must lie in [0, ", n, "], got ", aux_k);
  AECORE_CHECK(aux_k == 0 || dead_in.has_value(), "aecore: aux_k > 0 needs the dead mask");
  at::Tensor dead;
  if (aux_k > 0) {
    dead = dead_in->contiguous();
    AECORE_CHECK(dead.scalar_type() == at::kBool && dead.dim() == 1 && dead.size(0) == n,
                 "aecore: dead must be a bool mask (", n, ",), got ", dead.scalar_type(), " ",
                 dead.sizes());
    AECORE_CHECK(dead.device() == x_in.device(), "aecore: dead is on ", dead.device(),
                 ", expected ", x_in.device());
  }
  const at::Tensor xc = (x_in - b_dec_in).contiguous();
  const at::Tensor W = W_in.contiguous();
  const at::Tensor b_enc = b_enc_in.contiguous();
  AECORE_CHECK(std::max(k, aux_k) <= K::kMaxK, "aecore: topk_encode on this device keeps at most ",
               K::kMaxK, " entries per row, got k=", k, ", aux_k=", aux_k);
  at::Tensor values = at::empty({B, k}, x_in.options());
  at::Tensor indices = at::empty({B, k}, x_in.options().dtype(at::kLong));
  at::Tensor aux_values = at::empty({B, aux_k}, x_in.options());
  at::Tensor aux_indices = at::empty({B, aux_k}, x_in.options().dtype(at::kLong));
  if (B == 0) return {values, indices, aux_values, aux_indices};
  const int64_t tile = encoder_tile(B, n);
  at::Tensor buffer = at::empty({B, tile}, x_in.options());
  at::Tensor bad = at::zeros({1}, x_in.options().dtype(at::kInt));
  bool finite = true;
  dispatch_sae<K>(x_in.scalar_type(), [&]<typename T>() {
    using A = SaeAcc<T>;
    const auto acc = x_in.options().dtype(c10::CppTypeToScalarType<A>::value);
    at::Tensor heap = at::empty({B, k}, acc);
    at::Tensor aux_heap = at::empty({B, aux_k}, acc);
    A* hv = heap.data_ptr<A>();
    int64_t* hi = indices.data_ptr<int64_t>();
    A* aux_hv = aux_heap.data_ptr<A>();
    int64_t* aux_hi = aux_indices.data_ptr<int64_t>();
    const bool* mask = aux_k > 0 ? dead.data_ptr<bool>() : nullptr;
    K::template heap_init<T>(B, k, hv, hi);
    if (aux_k > 0) K::template heap_init<T>(B, aux_k, aux_hv, aux_hi);
    for (int64_t c0 = 0; c0 < n; c0 += tile) {
      const int64_t cols = std::min(tile, n - c0);
      at::Tensor pre = buffer.narrow(1, 0, cols);
      if (cols != tile) pre = at::empty({B, cols}, x_in.options());
      at::mm_out(pre, xc, W.narrow(0, c0, cols).t());
      const T* p = pre.data_ptr<T>();
      finite = K::template merge_tile<T>(p, B, cols, c0, b_enc.data_ptr<T>(), k, hv, hi,
                                         bad.data_ptr<int>(), nullptr) &&
               finite;
      if (aux_k > 0)
        K::template merge_tile<T>(p, B, cols, c0, b_enc.data_ptr<T>(), aux_k, aux_hv, aux_hi,
                                  bad.data_ptr<int>(), mask);
    }
    K::template heap_finish<T>(B, k, hv, hi, values.data_ptr<T>());
    if (aux_k > 0) K::template heap_finish<T>(B, aux_k, aux_hv, aux_hi, aux_values.data_ptr<T>());
  });
  if (check_finite) {
    // on CUDA the flag is device memory: reading it waits for the kernels
    AECORE_CHECK(finite && bad.item<int>() == 0,
                 "aecore: topk_encode met a NaN or infinite pre-activation: x, W_enc, b_enc or "
                 "b_dec holds non-finite values (or they overflow)");
  } else {
    // no read (a host sync on CUDA): every value becomes NaN instead, so the caller's
    // loss is NaN and its own finiteness check, batched with others, catches it
    if (!finite) bad.fill_(1);
    const at::Tensor poisoned = bad.ne(0);
    values.masked_fill_(poisoned, std::numeric_limits<double>::quiet_NaN());
    if (aux_k > 0) aux_values.masked_fill_(poisoned, std::numeric_limits<double>::quiet_NaN());
  }
  return {values, indices, aux_values, aux_indices};
}

// Gradients of topk_encode given the values' gradient: only the kept (row, latent) pairs
// with a positive value carry one.
template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_impl(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& W_in, const at::Tensor& b_dec) {
  check_code<K>(values, indices, W_in.size(0));
  check_same(values, grad_values, "grad_values");
  AECORE_CHECK(grad_values.sizes() == values.sizes(), "aecore: grad_values must be ",
               values.sizes(), ", got ", grad_values.sizes());
  check_sae_matrix<K>(x, "x");
  check_same(values, x, "x");
  check_same(values, W_in, "W_enc");
  AECORE_CHECK(W_in.dim() == 2 && W_in.size(1) == x.size(1) && x.size(0) == values.size(0),
               "aecore: x (B, d) and W_enc (n, d) must match the code's ", values.sizes(),
               ", got ", x.sizes(), " and ", W_in.sizes());
  check_vector(x, b_dec, "b_dec", x.size(1));
  const int64_t B = x.size(0), d = x.size(1), n = W_in.size(0), m = values.size(1);
  // a select, not a product with the gate: an infinite gradient at a zero value (sqrt's
  // at 0) must not become NaN where the ReLU passes nothing
  const at::Tensor g = at::where(values.gt(0), grad_values, 0).contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor W = W_in.contiguous();
  const at::Tensor xc = (x - b_dec).contiguous();
  at::Tensor grad_x = at::empty({B, d}, x.options());
  at::Tensor grad_W = at::empty({n, d}, x.options());
  at::Tensor grad_b_enc = at::empty({n}, x.options());
  dispatch_sae<K>(x.scalar_type(), [&]<typename T>() {
    K::template gather_sum<T>(g.data_ptr<T>(), idx.data_ptr<int64_t>(), B, m, W.data_ptr<T>(), d,
                              nullptr, grad_x.data_ptr<T>());
    K::template accumulate<T>(g.data_ptr<T>(), idx.data_ptr<int64_t>(), B, m, xc.data_ptr<T>(), d,
                              n, grad_W.data_ptr<T>(), grad_b_enc.data_ptr<T>());
  });
  at::Tensor grad_b_dec = -grad_x.sum(0);
  return {grad_x, grad_W, grad_b_enc, grad_b_dec};
}

template <class K>
at::Tensor sparse_decode_impl(const at::Tensor& values_in, const at::Tensor& indices_in,
                              const at::Tensor& W_in, const at::Tensor& b_in) {
  check_sae_matrix<K>(W_in, "W_dec");
  check_code<K>(values_in, indices_in, W_in.size(0));
  check_same(values_in, W_in, "W_dec");
  const int64_t B = values_in.size(0), m = values_in.size(1), d = W_in.size(1);
  check_vector(values_in, b_in, "b_dec", d);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor idx = indices_in.contiguous();
  const at::Tensor W = W_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  at::Tensor out = at::empty({B, d}, values.options());
  dispatch_sae<K>(values.scalar_type(), [&]<typename T>() {
    K::template gather_sum<T>(values.data_ptr<T>(), idx.data_ptr<int64_t>(), B, m, W.data_ptr<T>(),
                              d, b.data_ptr<T>(), out.data_ptr<T>());
  });
  return out;
}

template <class K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward_impl(
    const at::Tensor& grad_out_in, const at::Tensor& values_in, const at::Tensor& indices_in,
    const at::Tensor& W_in) {
  check_sae_matrix<K>(W_in, "W_dec");
  check_code<K>(values_in, indices_in, W_in.size(0));
  check_sae_matrix<K>(grad_out_in, "grad_out");
  check_same(values_in, grad_out_in, "grad_out");
  check_same(values_in, W_in, "W_dec");
  const int64_t B = values_in.size(0), m = values_in.size(1), n = W_in.size(0),
                d = W_in.size(1);
  AECORE_CHECK(grad_out_in.size(0) == B && grad_out_in.size(1) == d,
               "aecore: grad_out must be (", B, ", ", d, "), got ", grad_out_in.sizes());
  const at::Tensor g = grad_out_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor idx = indices_in.contiguous();
  const at::Tensor W = W_in.contiguous();
  at::Tensor grad_values = at::empty({B, m}, values.options());
  at::Tensor grad_W = at::empty({n, d}, values.options());
  dispatch_sae<K>(values.scalar_type(), [&]<typename T>() {
    K::template dots<T>(g.data_ptr<T>(), idx.data_ptr<int64_t>(), B, m, W.data_ptr<T>(), d,
                        grad_values.data_ptr<T>());
    K::template accumulate<T>(values.data_ptr<T>(), idx.data_ptr<int64_t>(), B, m, g.data_ptr<T>(),
                              d, n, grad_W.data_ptr<T>(), nullptr);
  });
  return {grad_values, grad_W, g.sum(0)};
}

// The decoder constraint's row passes, in place on contiguous tensors.
template <class K>
void remove_parallel_impl(at::Tensor& grad, const at::Tensor& weight) {
  check_sae_matrix<K>(grad, "grad");
  check_same(grad, weight, "weight");
  AECORE_CHECK(weight.sizes() == grad.sizes(), "aecore: weight must be ", grad.sizes(),
               ", got ", weight.sizes());
  AECORE_CHECK(grad.is_contiguous(), "aecore: grad must be contiguous (it is changed in place)");
  const at::Tensor w = weight.contiguous();
  dispatch_sae<K>(grad.scalar_type(), [&]<typename T>() {
    K::template remove_parallel<T>(grad.data_ptr<T>(), w.data_ptr<T>(), grad.size(0),
                                   grad.size(1));
  });
}

template <class K>
void set_row_norms_impl(at::Tensor& weight, double norm) {
  check_sae_matrix<K>(weight, "weight");
  AECORE_CHECK(norm > 0 && std::isfinite(norm), "aecore: norm must be positive and finite, got ",
               norm);
  AECORE_CHECK(weight.is_contiguous(), "aecore: weight must be contiguous (changed in place)");
  dispatch_sae<K>(weight.scalar_type(), [&]<typename T>() {
    K::template set_row_norms<T>(weight.data_ptr<T>(), weight.size(0), weight.size(1), norm);
  });
}

}  // namespace aecore
