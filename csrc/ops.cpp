// The torch.ops.aecore schemas, defined once for every backend. This is the Python
// extension module aecore._C; the kernels live in aecore._C_cpu (cpu/) and
// aecore._C_cuda (cuda/), each registering its implementations with
// TORCH_LIBRARY_IMPL, so either loads without the other. Fake (meta) kernels are
// registered from Python (aecore/ops/_fused.py), and so is the autograd of most ops;
// the sparsity penalties' autograd is here (below).
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

TORCH_LIBRARY(aecore, m) {
  // k Gibbs steps of an RBM; gaussian_visible / gaussian_hidden pick the unit types
  m.def(
      "gibbs_chain(Tensor v, Tensor W, Tensor b_v, Tensor b_h, int k, bool gaussian_visible, "
      "bool gaussian_hidden, bool sample_visible, Tensor rng, Tensor? noise_h0, "
      "Tensor? noise_h, Tensor? noise_v) "
      "-> (Tensor ph0, Tensor h0, Tensor v, Tensor v_mean, Tensor ph, Tensor h)");
  m.def(
      "cd_step(Tensor v, Tensor W, Tensor b_v, Tensor b_h, int k, Tensor? chain, "
      "bool gaussian_visible, bool gaussian_hidden, bool sample_visible, Tensor rng, "
      "Tensor? noise_h0, Tensor? noise_h, Tensor? noise_v) "
      "-> (Tensor dW, Tensor db_v, Tensor db_h, Tensor chain, Tensor recon_error)");
  m.def("kl_sparsity(Tensor h, float rho, float beta) -> (Tensor loss, Tensor mean)");
  // returns one row, (H,): the gradient of every row of h (callers broadcast it)
  m.def(
      "kl_sparsity_backward(Tensor grad_loss, Tensor? grad_mean, Tensor mean, SymInt rows, "
      "float rho, float beta) -> Tensor");
  m.def("topk_sparsify(Tensor z, int k) -> (Tensor out, Tensor indices)");
  m.def("topk_sparsify_backward(Tensor grad_out, Tensor indices) -> Tensor");
  // the sparse SAE: a top-k encoder that never holds the (B, n) pre-activations, and a
  // decoder that reads only the chosen dictionary rows. With aux_k > 0 the encoder also
  // picks each row's aux_k largest among the latents the bool mask `dead` (n,) marks
  // (AuxK), from the same tiles; its backward is straight-through (see _fused.py).
  // check_finite: raise on a NaN or infinite pre-activation; else the values become NaN
  // (no read of the kernels' flag, which on CUDA would wait for them)
  m.def(
      "topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k, int aux_k=0, "
      "Tensor? dead=None, bool check_finite=True) -> (Tensor values, Tensor indices, "
      "Tensor aux_values, Tensor aux_indices)");
  m.def(
      "topk_encode_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor x, "
      "Tensor W_enc, Tensor b_dec) "
      "-> (Tensor grad_x, Tensor grad_W_enc, Tensor grad_b_enc, Tensor grad_b_dec)");
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) -> Tensor");
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec) "
      "-> (Tensor grad_values, Tensor grad_W_dec, Tensor grad_b_dec)");
  // the SAE decoder's constraint, a row-local pass each: grad rows lose their component
  // along the weight rows; weight rows are scaled to a given norm
  m.def("remove_parallel_(Tensor(a!) grad, Tensor weight) -> ()");
  m.def("set_row_norms_(Tensor(a!) weight, float norm) -> ()");
  // a model's own update rule (the RBM's): v = momentum v + lr (step - weight_decay p),
  // p += v, for each (parameter, velocity, step); nothing changes unless every step is
  // finite. Returns whether it applied (a bool scalar on the parameters' device).
  m.def(
      "momentum_step_(Tensor(a!)[] params, Tensor(b!)[] velocities, Tensor[] steps, float lr, "
      "float momentum, float[] weight_decay) -> Tensor");
  // cd_step, then momentum_step_ on (W, b_v, b_h) with weight decay on W, then the PCD
  // chain advanced, in one call; nothing changes unless every statistic is finite
  m.def(
      "cd_update_(Tensor v, Tensor(a!) W, Tensor(b!) b_v, Tensor(c!) b_h, "
      "Tensor(d!) velocity_W, Tensor(e!) velocity_b_v, Tensor(f!) velocity_b_h, int k, "
      "Tensor(g!)? chain, bool gaussian_visible, bool gaussian_hidden, bool sample_visible, "
      "Tensor rng, float lr, float momentum, float weight_decay, Tensor? noise_h0, "
      "Tensor? noise_h, Tensor? noise_v) -> (Tensor recon_error, Tensor applied)");
  // torch.optim.Adam's step (AdamW's with decoupled) on each (parameter, gradient,
  // moments, step count), the gradients clipped to a total norm of max_norm; nothing
  // changes unless that norm is finite. Returns the norm (float64, before clipping).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, float? max_norm) -> Tensor");
}

// Autograd for the sparsity penalties in C++: they are cheap at typical sizes, where a
// Python autograd.Function (its apply, and the engine calling back into Python for the
// backward) cost more than the kernels. Each forward calls the op below autograd (its
// CPU or CUDA kernel); each backward calls the op's backward schema.
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The backward kernels have no derivatives of their own: under create_graph the
// gradient they give would differentiate as a constant, so a second derivative would be
// silently wrong.
void first_order_only(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), "aecore: ", op,
                              "'s fused backward has no derivative of its own: second "
                              "derivatives (create_graph=True) need aecore.ops.reference.",
                              op);
}

class KLSparsity : public torch::autograd::Function<KLSparsity> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& h, double rho, double beta) {
    static const auto kernel =
        op<std::tuple<Tensor, Tensor>(const Tensor&, double, double)>("aecore::kl_sparsity");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, mean] = kernel.call(h, rho, beta);
    ctx->set_materialize_grads(false);  // an unused mean's gradient stays undefined
    ctx->save_for_backward({mean});
    ctx->saved_data["rows"] = h.sym_size(0);
    ctx->saved_data["rho"] = rho;
    ctx->saved_data["beta"] = beta;
    return {loss, mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto kernel = op<Tensor(
        const Tensor&, const std::optional<Tensor>&, const Tensor&, c10::SymInt, double, double)>(
        "aecore::kl_sparsity_backward");
    first_order_only("kl_sparsity");
    const Tensor mean = ctx->get_saved_variables()[0];
    const c10::SymInt rows = ctx->saved_data["rows"].toSymInt();
    const Tensor grad_loss = grads[0].defined() ? grads[0] : at::zeros({}, mean.options());
    const std::optional<Tensor> grad_mean =
        grads[1].defined() ? std::optional<Tensor>(grads[1]) : std::nullopt;
    const Tensor row = kernel.call(grad_loss, grad_mean, mean, rows,
                                   ctx->saved_data["rho"].toDouble(),
                                   ctx->saved_data["beta"].toDouble());
    // every row's gradient is this one row: broadcast, as torch's sum backward does
    return {row.expand_symint({rows, row.sym_size(0)}), Tensor(), Tensor()};
  }
};

class TopkSparsify : public torch::autograd::Function<TopkSparsify> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, int64_t k) {
    static const auto kernel =
        op<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>("aecore::topk_sparsify");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, indices] = kernel.call(z, k);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    ctx->mark_non_differentiable({indices});
    return {out, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto kernel =
        op<Tensor(const Tensor&, const Tensor&)>("aecore::topk_sparsify_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    first_order_only("topk_sparsify");
    return {kernel.call(grads[0], ctx->get_saved_variables()[0]), Tensor()};
  }
};

std::tuple<Tensor, Tensor> kl_sparsity_autograd(const Tensor& h, double rho, double beta) {
  auto out = KLSparsity::apply(h, rho, beta);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> topk_sparsify_autograd(const Tensor& z, int64_t k) {
  auto out = TopkSparsify::apply(z, k);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(aecore, Autograd, m) {
  m.impl("kl_sparsity", &kl_sparsity_autograd);
  m.impl("topk_sparsify", &topk_sparsify_autograd);
}

extern "C" {
// A module with no methods: `import aecore._C` loads the library and runs the
// registrations above (the pattern of pytorch/extension-cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
