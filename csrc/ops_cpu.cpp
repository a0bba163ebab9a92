// CPU binding: defines the torch.ops.aecore schemas and registers the CPU kernels.
// This is also the Python extension module aecore._C (it has no Python functions of its
// own: importing it runs the registrations below).
#include <Python.h>

#include <torch/library.h>

#include "kernels/rbm_cpu.h"
#include "kernels/sparsity_cpu.h"
#include "ops_common.h"

namespace aecore {

struct CpuKernels {
  template <typename T>
  static void unit_pass(const UnitPass<T>& p) {
    cpu::unit_pass<T>(p);
  }
  template <typename T>
  static void column_sums(const T* x, int64_t rows, int64_t cols, double* out) {
    cpu::column_sums<T>(x, rows, cols, out);
  }
  template <typename T>
  static void finalize_stats(const StatsFinal<T>& f) {
    for (int64_t e = 0; e <= f.V + f.H; ++e) finalize_stats_element(f, e);
  }
  template <typename T>
  static void kl_forward(const T* h, int64_t rows, int64_t cols, double rho, double beta, T* mean,
                         T* loss) {
    *loss = static_cast<T>(cpu::kl_sparsity_forward<T>(h, rows, cols, rho, beta, mean));
  }
  template <typename T>
  static void kl_backward(const T* grad_loss, const T* grad_mean, const T* mean, int64_t rows,
                          int64_t cols, double rho, double beta, T* grad) {
    cpu::kl_sparsity_backward<T>(*grad_loss, grad_mean, mean, rows, cols, rho, beta, grad);
  }
  template <typename T>
  static void topk_forward(const T* z, int64_t rows, int64_t cols, int64_t k, T* out,
                           int64_t* idx) {
    cpu::topk_forward<T>(z, rows, cols, k, out, idx);
  }
  template <typename T>
  static void topk_backward(const T* g, const int64_t* idx, int64_t rows, int64_t cols, int64_t k,
                            T* grad) {
    cpu::topk_backward<T>(g, idx, rows, cols, k, grad);
  }
};

TORCH_LIBRARY(aecore, m) {
  m.def(
      "gibbs_chain(Tensor v, Tensor W, Tensor b_v, Tensor b_h, int k, bool gaussian, "
      "bool sample_visible, Tensor rng, Tensor? noise_h0, Tensor? noise_h, Tensor? noise_v) "
      "-> (Tensor ph0, Tensor h0, Tensor v, Tensor v_mean, Tensor ph, Tensor h)");
  m.def(
      "cd_step(Tensor v, Tensor W, Tensor b_v, Tensor b_h, int k, Tensor? chain, bool gaussian, "
      "bool sample_visible, Tensor rng, Tensor? noise_h0, Tensor? noise_h, Tensor? noise_v) "
      "-> (Tensor dW, Tensor db_v, Tensor db_h, Tensor chain, Tensor recon_error)");
  m.def("kl_sparsity(Tensor h, float rho, float beta) -> (Tensor loss, Tensor mean)");
  m.def(
      "kl_sparsity_backward(Tensor grad_loss, Tensor? grad_mean, Tensor mean, SymInt rows, "
      "float rho, float beta) -> Tensor");
  m.def("topk_sparsify(Tensor z, int k) -> (Tensor out, Tensor indices)");
  m.def("topk_sparsify_backward(Tensor grad_out, Tensor indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(aecore, CPU, m) {
  m.impl("gibbs_chain", &gibbs_chain_impl<CpuKernels>);
  m.impl("cd_step", &cd_step_impl<CpuKernels>);
  m.impl("kl_sparsity", &kl_sparsity_impl<CpuKernels>);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward_impl<CpuKernels>);
  m.impl("topk_sparsify", &topk_sparsify_impl<CpuKernels>);
  m.impl("topk_sparsify_backward", &topk_sparsify_backward_impl<CpuKernels>);
}

}  // namespace aecore

extern "C" {
// A module with no methods: `import aecore._C` loads the library and runs the
// registrations above (the pattern of pytorch/extension-cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
