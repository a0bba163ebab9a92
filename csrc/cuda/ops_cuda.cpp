// CUDA implementations of the torch.ops.aecore schemas (defined in ../ops.cpp). Built
// only where torch has CUDA; this is the Python extension module aecore._C_cuda.
#include <Python.h>

// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>
#include <type_traits>

#include "cuda/kernels.cuh"
#include "ops_impl.h"
#include "sae_impl.h"
#include "update_impl.h"

namespace aecore {

// ATen's 16-bit float types and the CUDA headers' ones share their layout.
template <typename T>
struct DeviceOf {
  using type = T;
};
template <>
struct DeviceOf<c10::Half> {
  using type = __half;
};
template <>
struct DeviceOf<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
typename DeviceOf<T>::type* dev(T* p) {
  return reinterpret_cast<typename DeviceOf<T>::type*>(p);
}
template <typename T>
const typename DeviceOf<T>::type* dev(const T* p) {
  return reinterpret_cast<const typename DeviceOf<T>::type*>(p);
}

struct CudaKernels {
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static at::TensorOptions doubles() {
    return at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, c10::cuda::current_device());
  }
  template <typename T>
  static void unit_pass(const UnitPass<T>& p) {
    const bool sums = p.colsum_mean || p.colsum_state || p.colsum_data || p.sq_err;
    at::Tensor workspace =
        sums ? at::empty({cuda::unit_pass_workspace(p.rows, p.cols)}, doubles()) : at::Tensor();
    cuda::unit_pass<T>(p, sums ? workspace.data_ptr<double>() : nullptr, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void finalize_stats(const StatsFinal<T>& f) {
    cuda::finalize_stats<T>(f, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void kl_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta, T* mean,
                         T* loss) {
    at::Tensor workspace = at::empty({cuda::kl_forward_workspace(rows, cols)}, doubles());
    cuda::kl_forward<T>(h, rows, cols, rho, beta, mean, loss, workspace.data_ptr<double>(),
                        stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void kl_backward(const T* grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                          int64_t cols, double rho, double beta, T* grad) {
    cuda::kl_backward<T>(grad_loss, grad_mean, mean, rows, cols, rho, beta, grad, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out,
                           int64_t* idx) {
    cuda::topk_forward<T>(z, rows, cols, k, out, idx, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void topk_backward(const T* g, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                            T* grad) {
    cuda::topk_backward<T>(g, idx, rows, cols, k, grad, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // the sparse SAE ops: float, double, half and bfloat16; k up to the heap's size
  static constexpr bool kHalfTypes = true;
  static constexpr int64_t kMaxK = cuda::kMaxHeap;
  template <typename T>
  using D = typename DeviceOf<T>::type;

  template <typename T>
  static void gather_sum(const T* values, const int64_t* idx, int64_t rows, int64_t m,
                         const T* W, int64_t d, const T* bias, T* out) {
    cuda::sae_gather_sum<D<T>>(dev(values), idx, rows, m, dev(W), d, dev(bias), dev(out),
                               stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void dots(const T* g, const int64_t* idx, int64_t rows, int64_t m, const T* W,
                   int64_t d, T* out) {
    cuda::sae_dots<D<T>>(dev(g), idx, rows, m, dev(W), d, dev(out), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The entries grouped by latent with a stable sort (index plumbing in ATen), then one
  // kernel sums each latent's entries in order: deterministic, no atomics.
  template <typename T>
  static void accumulate(const T* values, const int64_t* idx, int64_t rows, int64_t m,
                         const T* src, int64_t d, int64_t n, T* grad_W, T* grad_b) {
    const at::Device device(at::kCUDA, c10::cuda::current_device());
    const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
    // the device given, so that no pointer query runs (it fails on an empty code's null)
    const at::Tensor flat = at::for_blob(const_cast<int64_t*>(idx), {rows * m})
                                .options(longs)
                                .target_device(device)
                                .make_tensor();
    const auto [sorted, order] = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor start = at::searchsorted(sorted, at::arange(n + 1, longs));
    cuda::sae_accumulate<D<T>>(dev(values), order.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                               m, dev(src), d, n, dev(grad_W), dev(grad_b), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void heap_init(int64_t rows, int64_t k, SaeAcc<T>* hv, int64_t* hi) {
    cuda::sae_heap_init<D<T>>(rows, k, hv, hi, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static bool merge_tile(const T* pre, int64_t rows, int64_t cols, int64_t col0, const T* b,
                         int64_t k, SaeAcc<T>* hv, int64_t* hi, int* bad, const bool* mask) {
    cuda::sae_merge_tile<D<T>>(dev(pre), rows, cols, col0, dev(b), k, hv, hi, bad, mask,
                               stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;  // a NaN sets *bad on the device
  }
  template <typename T>
  static void remove_parallel(T* grad, const T* w, int64_t rows, int64_t d) {
    cuda::sae_remove_parallel<D<T>>(dev(grad), dev(w), rows, d, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void set_row_norms(T* w, int64_t rows, int64_t d, double norm) {
    cuda::sae_set_row_norms<D<T>>(dev(w), rows, d, norm, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void check_finite(const T* s, int64_t n, bool* ok) {
    cuda::check_finite<T>(s, n, ok, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void momentum_update(T* p, T* v, const T* s, int64_t n, T lr, T momentum, T decay,
                              const bool* ok) {
    cuda::momentum_update<T>(p, v, s, n, lr, momentum, decay, ok, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  static void heap_finish(int64_t rows, int64_t k, SaeAcc<T>* hv, int64_t* hi, T* values) {
    cuda::sae_heap_finish<D<T>>(rows, k, hv, hi, dev(values), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

namespace {

// Each entry point runs on the device of its first tensor (multi-GPU safety).
GibbsOut gibbs_chain_cuda(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                          const at::Tensor& b_h, int64_t k, bool gaussian_visible,
                          bool gaussian_hidden, bool sample_visible, const at::Tensor& rng,
                          const std::optional<at::Tensor>& nh0,
                          const std::optional<at::Tensor>& nh,
                          const std::optional<at::Tensor>& nv) {
  const c10::cuda::CUDAGuard guard(v.device());
  return gibbs_chain_impl<CudaKernels>(v, W, b_v, b_h, k, gaussian_visible, gaussian_hidden,
                                       sample_visible, rng, nh0, nh, nv);
}

CDOut cd_step_cuda(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                   const at::Tensor& b_h, int64_t k, const std::optional<at::Tensor>& chain,
                   bool gaussian_visible, bool gaussian_hidden, bool sample_visible,
                   const at::Tensor& rng, const std::optional<at::Tensor>& nh0,
                   const std::optional<at::Tensor>& nh, const std::optional<at::Tensor>& nv) {
  const c10::cuda::CUDAGuard guard(v.device());
  return cd_step_impl<CudaKernels>(v, W, b_v, b_h, k, chain, gaussian_visible, gaussian_hidden,
                                   sample_visible, rng, nh0, nh, nv);
}

std::tuple<at::Tensor, at::Tensor> kl_sparsity_cuda(const at::Tensor& h, double rho, double beta) {
  const c10::cuda::CUDAGuard guard(h.device());
  return kl_sparsity_impl<CudaKernels>(h, rho, beta);
}

at::Tensor kl_sparsity_backward_cuda(const at::Tensor& grad_loss,
                                     const std::optional<at::Tensor>& grad_mean,
                                     const at::Tensor& mean, int64_t rows, double rho,
                                     double beta) {
  const c10::cuda::CUDAGuard guard(mean.device());
  return kl_sparsity_backward_impl<CudaKernels>(grad_loss, grad_mean, mean, rows, rho, beta);
}

std::tuple<at::Tensor, at::Tensor> topk_sparsify_cuda(const at::Tensor& z, int64_t k) {
  const c10::cuda::CUDAGuard guard(z.device());
  return topk_sparsify_impl<CudaKernels>(z, k);
}

at::Tensor topk_sparsify_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return topk_sparsify_backward_impl<CudaKernels>(grad_out, idx);
}

TopkCode topk_encode_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b_enc,
                          const at::Tensor& b_dec, int64_t k, int64_t aux_k,
                          const std::optional<at::Tensor>& dead, bool check_finite) {
  const c10::cuda::CUDAGuard guard(x.device());
  return topk_encode_impl<CudaKernels>(x, W, b_enc, b_dec, k, aux_k, dead, check_finite);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cuda(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& b_dec) {
  const c10::cuda::CUDAGuard guard(values.device());
  return topk_encode_backward_impl<CudaKernels>(grad_values, values, indices, x, W, b_dec);
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& W, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(values.device());
  return sparse_decode_impl<CudaKernels>(values, indices, W, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W) {
  const c10::cuda::CUDAGuard guard(values.device());
  return sparse_decode_backward_impl<CudaKernels>(grad_out, values, indices, W);
}

void remove_parallel_cuda(at::Tensor& grad, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(grad.device());
  remove_parallel_impl<CudaKernels>(grad, weight);
}

void set_row_norms_cuda(at::Tensor& weight, double norm) {
  const c10::cuda::CUDAGuard guard(weight.device());
  set_row_norms_impl<CudaKernels>(weight, norm);
}

at::Tensor momentum_step_cuda(at::TensorList params, at::TensorList velocities,
                              at::TensorList steps, double lr, double momentum,
                              at::ArrayRef<double> weight_decay) {
  AECORE_CHECK(!params.empty(), "aecore: momentum_step_ needs at least one parameter");
  const c10::cuda::CUDAGuard guard(params[0].device());
  return momentum_step_impl<CudaKernels>(params, velocities, steps, lr, momentum, weight_decay);
}

std::tuple<at::Tensor, at::Tensor> cd_update_cuda(
    const at::Tensor& v, at::Tensor& W, at::Tensor& b_v, at::Tensor& b_h, at::Tensor& velocity_W,
    at::Tensor& velocity_b_v, at::Tensor& velocity_b_h, int64_t k,
    const std::optional<at::Tensor>& chain, bool gaussian_visible, bool gaussian_hidden,
    bool sample_visible, const at::Tensor& rng, double lr, double momentum, double weight_decay,
    const std::optional<at::Tensor>& nh0, const std::optional<at::Tensor>& nh,
    const std::optional<at::Tensor>& nv) {
  const c10::cuda::CUDAGuard guard(v.device());
  return cd_update_impl<CudaKernels>(v, W, b_v, b_h, velocity_W, velocity_b_v, velocity_b_h, k,
                                     chain, gaussian_visible, gaussian_hidden, sample_visible,
                                     rng, lr, momentum, weight_decay, nh0, nh, nv);
}

}  // namespace

TORCH_LIBRARY_IMPL(aecore, CUDA, m) {
  m.impl("gibbs_chain", &gibbs_chain_cuda);
  m.impl("cd_step", &cd_step_cuda);
  m.impl("kl_sparsity", &kl_sparsity_cuda);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward_cuda);
  m.impl("topk_sparsify", &topk_sparsify_cuda);
  m.impl("topk_sparsify_backward", &topk_sparsify_backward_cuda);
  m.impl("topk_encode", &topk_encode_cuda);
  m.impl("topk_encode_backward", &topk_encode_backward_cuda);
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
  m.impl("remove_parallel_", &remove_parallel_cuda);
  m.impl("set_row_norms_", &set_row_norms_cuda);
  m.impl("momentum_step_", &momentum_step_cuda);
  m.impl("cd_update_", &cd_update_cuda);
}

}  // namespace aecore

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
