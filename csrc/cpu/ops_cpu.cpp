// CPU implementations of the torch.ops.aecore schemas (defined in ../ops.cpp). This is
// the Python extension module aecore._C_cpu: importing it runs the registrations below.
#include <Python.h>

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/adam_cpu.h"
#include "cpu/rbm_cpu.h"
#include "cpu/sae_cpu.h"
#include "cpu/sparsity_cpu.h"
#include "cpu/topk_cpu.h"
#include "cpu/update_cpu.h"
#include "ops_impl.h"
#include "sae_impl.h"
#include "update_impl.h"

// MKL's per-thread thread count (exported by libtorch_cpu when torch uses MKL). Weak, so
// that the extension still loads against a torch built with another BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace aecore {

// Small Gibbs problems run on the calling thread alone, GEMMs included: at RBM sizes like
// 64x64x256 a fork/join of the BLAS / OpenMP team costs about as much as the GEMM itself,
// and on a busy machine (another thread pool spinning, e.g. numpy's OpenBLAS after a
// call) a team that waits for a descheduled thread can take far longer. Both knobs are
// per thread (the OpenMP ICV and MKL's local setting), restored on exit, so other threads
// and later calls are unaffected.
class SerialScope {
 public:
  explicit SerialScope(bool on) : on_(on) {
    if (!on_) return;
#ifdef _OPENMP
    omp_prev_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    if (MKL_Set_Num_Threads_Local) mkl_prev_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialScope() {
    if (!on_) return;
#ifdef _OPENMP
    omp_set_num_threads(omp_prev_);
#endif
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_prev_);
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool on_;
  int omp_prev_ = 1;
  int mkl_prev_ = 0;
};

// Multiply-adds of one GEMM of the chain, B x V x H (B the larger of the data and chain
// batches); below the threshold the whole op runs serially (see SerialScope).
inline bool gibbs_is_small(const at::Tensor& v, const at::Tensor& W,
                           const std::optional<at::Tensor>& chain) {
  constexpr int64_t threshold = int64_t(1) << 21;  // 2M: digits' 64x64x256 is 1M
  if (v.dim() != 2 || W.dim() != 2) return false;  // the op reports the error
  int64_t B = v.size(0);
  if (chain.has_value() && chain->dim() == 2) B = std::max(B, chain->size(0));
  return B * v.size(1) * W.size(1) < threshold;
}

struct CpuKernels {
  template <typename T>
  static void unit_pass(const UnitPass<T>& p) {
    cpu::unit_pass<T>(p);
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
  template <typename T>
  static void gather_sum(const T* values, const int64_t* idx, int64_t rows, int64_t m,
                         const T* W, int64_t d, const T* bias, T* out) {
    cpu::sparse_gather_sum<T>(values, idx, rows, m, W, d, bias, out);
  }
  template <typename T>
  static void dots(const T* g, const int64_t* idx, int64_t rows, int64_t m, const T* W,
                   int64_t d, T* out) {
    cpu::sparse_dots<T>(g, idx, rows, m, W, d, out);
  }
  template <typename T>
  static void accumulate(const T* values, const int64_t* idx, int64_t rows, int64_t m,
                         const T* src, int64_t d, int64_t n, T* grad_W, T* grad_b) {
    cpu::sparse_accumulate<T>(values, idx, rows, m, src, d, n, grad_W, grad_b);
  }
  // the sparse SAE ops: float and double, any k
  static constexpr bool kHalfTypes = false;
  static constexpr int64_t kMaxK = std::numeric_limits<int64_t>::max();
  template <typename T>
  static void heap_init(int64_t rows, int64_t k, T* hv, int64_t* hi) {
    cpu::topk_heap_init<T>(rows, k, hv, hi);
  }
  template <typename T>
  static bool merge_tile(const T* pre, int64_t rows, int64_t cols, int64_t col0, const T* b,
                         int64_t k, T* hv, int64_t* hi, int* /*bad: the result says it*/,
                         const bool* mask) {
    return cpu::topk_merge_tile<T>(pre, rows, cols, col0, b, k, hv, hi, mask);
  }
  template <typename T>
  static void heap_finish(int64_t rows, int64_t k, T* hv, int64_t* hi, T* values) {
    cpu::topk_heap_finish<T>(rows, k, hv, hi, values);
  }
  template <typename T>
  static void remove_parallel(T* grad, const T* w, int64_t rows, int64_t d) {
    cpu::remove_parallel<T>(grad, w, rows, d);
  }
  template <typename T>
  static void set_row_norms(T* w, int64_t rows, int64_t d, double norm) {
    cpu::set_row_norms<T>(w, rows, d, static_cast<T>(norm));
  }
  template <typename T>
  static void check_finite(const T* s, int64_t n, bool* ok) {
    if (*ok && !cpu::all_finite<T>(s, n)) *ok = false;
  }
  template <typename T>
  static void momentum_update(T* p, T* v, const T* s, int64_t n, T lr, T momentum, T decay,
                              const bool* ok) {
    if (*ok) cpu::momentum_update<T>(p, v, s, n, lr, momentum, decay);
  }
};

GibbsOut gibbs_chain_cpu(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                         const at::Tensor& b_h, int64_t k, bool gaussian_visible,
                         bool gaussian_hidden, bool sample_visible, const at::Tensor& rng,
                         const std::optional<at::Tensor>& noise_h0,
                         const std::optional<at::Tensor>& noise_h,
                         const std::optional<at::Tensor>& noise_v) {
  SerialScope serial(gibbs_is_small(v, W, std::nullopt));
  return gibbs_chain_impl<CpuKernels>(v, W, b_v, b_h, k, gaussian_visible, gaussian_hidden,
                                      sample_visible, rng, noise_h0, noise_h, noise_v);
}

CDOut cd_step_cpu(const at::Tensor& v, const at::Tensor& W, const at::Tensor& b_v,
                  const at::Tensor& b_h, int64_t k, const std::optional<at::Tensor>& chain,
                  bool gaussian_visible, bool gaussian_hidden, bool sample_visible,
                  const at::Tensor& rng, const std::optional<at::Tensor>& noise_h0,
                  const std::optional<at::Tensor>& noise_h,
                  const std::optional<at::Tensor>& noise_v) {
  SerialScope serial(gibbs_is_small(v, W, chain));
  return cd_step_impl<CpuKernels>(v, W, b_v, b_h, k, chain, gaussian_visible, gaussian_hidden,
                                  sample_visible, rng, noise_h0, noise_h, noise_v);
}

std::tuple<at::Tensor, at::Tensor> cd_update_cpu(
    const at::Tensor& v, at::Tensor& W, at::Tensor& b_v, at::Tensor& b_h, at::Tensor& velocity_W,
    at::Tensor& velocity_b_v, at::Tensor& velocity_b_h, int64_t k,
    const std::optional<at::Tensor>& chain, bool gaussian_visible, bool gaussian_hidden,
    bool sample_visible, const at::Tensor& rng, double lr, double momentum, double weight_decay,
    const std::optional<at::Tensor>& noise_h0, const std::optional<at::Tensor>& noise_h,
    const std::optional<at::Tensor>& noise_v) {
  SerialScope serial(gibbs_is_small(v, W, chain));
  return cd_update_impl<CpuKernels>(v, W, b_v, b_h, velocity_W, velocity_b_v, velocity_b_h, k,
                                    chain, gaussian_visible, gaussian_hidden, sample_visible, rng,
                                    lr, momentum, weight_decay, noise_h0, noise_h, noise_v);
}

// The tensors adam_step_ writes must not share memory: the update would read what another
// entry's update wrote (sorted by address, each must end before the next begins).
inline void check_distinct_writes(at::TensorList params, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList steps) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (at::TensorList list : {params, exp_avgs, exp_avg_sqs, steps})
    for (const at::Tensor& t : list) {
      const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.emplace_back(start, start + t.numel() * t.element_size());
    }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    AECORE_CHECK(spans[i].first >= spans[i - 1].second, "aecore: adam_step_ writes its "
                 "parameters, moments and step counts in place: no two may share memory");
}

// Adam (decoupled: AdamW) on every (parameter, gradient, moments, step), torch.optim's
// formulas, after one read of the gradients: nothing changes unless their norm is finite.
// Returns that norm (float64, before clipping to max_norm).
at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                         double beta1, double beta2, double eps, double weight_decay,
                         bool decoupled, std::optional<double> max_norm) {
  const char* op = "adam_step_";
  const size_t n = params.size();
  AECORE_CHECK(n >= 1, "aecore: ", op, " needs at least one parameter");
  AECORE_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                   steps.size() == n,
               "aecore: ", op, " needs one gradient, two moments and a step per parameter; got ",
               n, " parameters, ", grads.size(), " gradients, ", exp_avgs.size(), " exp_avgs, ",
               exp_avg_sqs.size(), " exp_avg_sqs, ", steps.size(), " steps");
  AECORE_CHECK(std::isfinite(lr) && lr >= 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 &&
                   beta2 < 1 && std::isfinite(eps) && eps >= 0 && std::isfinite(weight_decay) &&
                   weight_decay >= 0,
               "aecore: ", op, " needs lr, eps, weight_decay >= 0 (finite) and betas in [0, 1); "
               "got lr=", lr, ", betas=(", beta1, ", ", beta2, "), eps=", eps,
               ", weight_decay=", weight_decay);
  AECORE_CHECK(!max_norm.has_value() || (std::isfinite(*max_norm) && *max_norm > 0), "aecore: ",
               op, " needs max_norm > 0 (finite) or None");
  const at::Tensor& first = params[0];
  AECORE_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
               "aecore: ", op, " needs float32 or float64 parameters, got ",
               first.scalar_type());
  std::vector<at::Tensor> g(n);
  for (size_t i = 0; i < n; ++i) {
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      AECORE_CHECK(t->layout() == at::kStrided && t->is_cpu() &&
                       t->scalar_type() == first.scalar_type(),
                   "aecore: ", op, " tensors must be dense, on the CPU and of one dtype");
      AECORE_CHECK(t->sizes() == params[i].sizes(), "aecore: ", op, " entry ", i,
                   ": parameter, gradient and moment shapes differ");
    }
    AECORE_CHECK(params[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                     exp_avg_sqs[i].is_contiguous(),
                 "aecore: ", op, " changes parameters and moments in place: they must be "
                 "contiguous");
    AECORE_CHECK(steps[i].is_cpu() && steps[i].numel() == 1 &&
                     (steps[i].scalar_type() == at::kFloat ||
                      steps[i].scalar_type() == at::kDouble),
                 "aecore: ", op, " steps[", i, "] must be a float32 or float64 CPU scalar");
    g[i] = grads[i].contiguous();
  }
  std::vector<double> counts(n);  // each parameter's step count after this step
  for (size_t i = 0; i < n; ++i) {
    counts[i] = (steps[i].scalar_type() == at::kFloat
                     ? static_cast<double>(*steps[i].data_ptr<float>())
                     : *steps[i].data_ptr<double>()) + 1.0;
    AECORE_CHECK(std::isfinite(counts[i]) && counts[i] >= 1.0, "aecore: ", op,
                 " step counts must be finite numbers >= 0, got ", counts[i] - 1.0,
                 " at steps[", i, "]");
  }
  check_distinct_writes(params, exp_avgs, exp_avg_sqs, steps);
  double norm = 0.0;
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "aecore_adam_norm", [&] {
    for (size_t i = 0; i < n; ++i)
      norm += cpu::sum_squares<scalar_t>(g[i].data_ptr<scalar_t>(), g[i].numel());
    // squares beyond the gradients' dtype overflow there, as torch's norm in it does
    norm = norm > static_cast<double>(std::numeric_limits<scalar_t>::max())
               ? std::numeric_limits<double>::infinity()
               : std::sqrt(norm);
  });
  at::Tensor out = at::scalar_tensor(norm, first.options().dtype(at::kDouble));
  if (!std::isfinite(norm)) return out;
  // torch.nn.utils.clip_grad_norm_'s coefficient
  const double scale = max_norm.has_value() ? std::min(1.0, *max_norm / (norm + 1e-6)) : 1.0;
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "aecore_adam_step", [&] {
    for (size_t i = 0; i < n; ++i) {
      at::Tensor step = steps[i];
      const double t = counts[i];
      cpu::AdamCoefs<scalar_t> c;
      c.weight1 = static_cast<scalar_t>(1.0 - beta1);
      c.beta2 = static_cast<scalar_t>(beta2);
      c.weight2 = static_cast<scalar_t>(1.0 - beta2);
      c.eps = static_cast<scalar_t>(eps);
      c.step_size = static_cast<scalar_t>(lr / (1.0 - std::pow(beta1, t)));
      c.bc2_sqrt = static_cast<scalar_t>(std::sqrt(1.0 - std::pow(beta2, t)));
      c.grad_scale = static_cast<scalar_t>(scale);
      c.decay = static_cast<scalar_t>(decoupled ? 1.0 - lr * weight_decay : weight_decay);
      c.decoupled = decoupled;
      c.has_decay = weight_decay != 0.0;
      cpu::adam_update<scalar_t>(params[i].data_ptr<scalar_t>(), exp_avgs[i].data_ptr<scalar_t>(),
                                 exp_avg_sqs[i].data_ptr<scalar_t>(), g[i].data_ptr<scalar_t>(),
                                 params[i].numel(), c);
      if (step.scalar_type() == at::kFloat) {
        *step.data_ptr<float>() = static_cast<float>(t);
      } else {
        *step.data_ptr<double>() = t;
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(aecore, CPU, m) {
  m.impl("gibbs_chain", &gibbs_chain_cpu);
  m.impl("cd_step", &cd_step_cpu);
  m.impl("kl_sparsity", &kl_sparsity_impl<CpuKernels>);
  m.impl("kl_sparsity_backward", &kl_sparsity_backward_impl<CpuKernels>);
  m.impl("topk_sparsify", &topk_sparsify_impl<CpuKernels>);
  m.impl("topk_sparsify_backward", &topk_sparsify_backward_impl<CpuKernels>);
  m.impl("topk_encode", &topk_encode_impl<CpuKernels>);
  m.impl("topk_encode_backward", &topk_encode_backward_impl<CpuKernels>);
  m.impl("sparse_decode", &sparse_decode_impl<CpuKernels>);
  m.impl("sparse_decode_backward", &sparse_decode_backward_impl<CpuKernels>);
  m.impl("remove_parallel_", &remove_parallel_impl<CpuKernels>);
  m.impl("set_row_norms_", &set_row_norms_impl<CpuKernels>);
  m.impl("momentum_step_", &momentum_step_impl<CpuKernels>);
  m.impl("cd_update_", &cd_update_cpu);
  m.impl("adam_step_", &adam_step_cpu);
}

}  // namespace aecore

extern "C" {
PyMODINIT_FUNC PyInit__C_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
