// The torch.ops.aecore schemas, defined once for every backend. This is the Python
// extension module aecore._C; the kernels live in aecore._C_cpu (cpu/) and
// aecore._C_cuda (cuda/), each registering its implementations with
// TORCH_LIBRARY_IMPL, so either loads without the other. Fake (meta) kernels and
// autograd are registered from Python (aecore/ops/_fused.py).
#include <Python.h>

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
  // decoder that reads only the chosen dictionary rows
  m.def(
      "topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k) "
      "-> (Tensor values, Tensor indices)");
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
}

extern "C" {
// A module with no methods: `import aecore._C` loads the library and runs the
// registrations above (the pattern of pytorch/extension-cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
