"""aecore.ops: the one door to aecore's kernels.

Each op runs the compiled CUDA kernels on CUDA tensors, the compiled CPU kernels on CPU
tensors, and otherwise the pure-PyTorch reference in :mod:`aecore.ops.reference` (same
function, also the test oracle). ``AECORE_DISABLE_EXT=1`` (read at import) forces the
reference; :func:`backend` says which implementation runs and why.

RBM conventions: ``v`` (B, V), ``W`` (V, H) (Hinton's layout; scikit-learn's
``components_`` is ``W.T``), ``b_v`` (V,), ``b_h`` (H,); float32 or float64, one device.
Each layer's units are ``"bernoulli"`` (sigmoid means, 0/1 samples) or ``"gaussian"``
(unit variance: linear means, mean + N(0, 1) samples).

* :func:`gibbs_chain` -> :class:`GibbsChain`: k Gibbs steps v -> h -> v -> h.
* :func:`cd_step` -> :class:`CDStats`: CD-k statistics, or PCD-k with ``chain=``.
* :func:`kl_sparsity` -> 0-d tensor: β · Σ_j KL(ρ ‖ ρ̂_j), differentiable.
* :func:`topk_sparsify` -> tensor: k largest entries per row kept, differentiable.
* :func:`topk_encode` -> ``(values, indices)``: a top-k SAE encoder that never holds the
  (B, n) pre-activations (:func:`topk_encode_max_k`: the largest k it keeps fused);
  :func:`sparse_decode`: its decoder, reading only the chosen dictionary rows. Both
  differentiable, with sparse backward kernels.
* :func:`remove_parallel_`, :func:`set_row_norms_`: the SAE decoder's unit-norm
  constraint, each one row-local pass, in place.
* :func:`momentum_step_`: the momentum update of a model with its own update rule
  (the RBM's), skipped unless every step is finite; one pass per parameter.
* :func:`cd_update_`: a whole CD / PCD training step in place (cd_step, then
  momentum_step_, then the chain advanced) in one call; :func:`cd_update_own_`, the same
  for a model's own operands, checked only where the kernels refuse them.
* :func:`adam_step_`: torch.optim.Adam's (or AdamW's) step with gradient clipping,
  skipped unless the gradients' norm is finite; on the CPU one call for all parameters
  (CUDA runs the reference: torch's fused Adam serves it).

Sampling is reproducible: the fused kernels draw from Philox-4x32-10 keyed by a seed and
an offset taken from ``generator`` (or torch's default generator), so the same seed gives
the same samples. The CPU and CUDA streams differ from each other and from the
reference's; supply :class:`GibbsNoise` to get the exact, deterministic path. The
statistics' sums run in a fixed order (no atomics on CUDA), so a seeded run repeats
exactly on the same device and thread count.

The Gibbs ops and the in-place updates (``*_``) are not differentiable (the Gibbs ops
detach their inputs); kl_sparsity, topk_sparsify, topk_encode and sparse_decode are,
with fused backward kernels: first derivatives only (``create_graph=True`` is refused:
the references in :mod:`aecore.ops.reference` differentiate twice), and not under
``torch.func`` transforms (``grad``, ``vmap`` of a gradient): their autograd functions
are the classic kind.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from aecore.errors import ConfigError
from aecore.ops import _fused, reference
from aecore.ops import validation as check
from aecore.ops._extension import CUDA_TOPK_ENCODE_MAX_K, OPS, backend, backend_report, fused
from aecore.ops.types import KL_EPS, CDStats, GibbsChain, GibbsNoise
from aecore.ops.updates import adam_step_, cd_update_, cd_update_own_, momentum_step_
from aecore.ops.validation import MAX_GIBBS_STEPS

__all__ = [
    "EXPORT_DECOMPOSITIONS",
    "KL_EPS",
    "MAX_GIBBS_STEPS",
    "OPS",
    "CDStats",
    "GibbsChain",
    "GibbsNoise",
    "adam_step_",
    "backend",
    "backend_report",
    "cd_step",
    "cd_update_",
    "cd_update_own_",
    "gibbs_chain",
    "kl_sparsity",
    "momentum_step_",
    "reference",
    "remove_parallel_",
    "set_row_norms_",
    "sparse_decode",
    "topk_encode",
    "topk_encode_max_k",
    "topk_sparsify",
]

#: plain-PyTorch equivalents of the ops that sit on inference paths, by op name, with
#: the compiled op's arguments and results: what aecore.onnx exports in their place
EXPORT_DECOMPOSITIONS = {"topk_sparsify": reference.topk}


def _run_gibbs(op: str, v, W, b_v, b_h, **kwargs) -> GibbsChain | CDStats:
    call = check.gibbs_call(op, v, W, b_v, b_h, **kwargs)
    if fused(v):
        return _fused.run_gibbs(call)
    with torch.no_grad():
        return reference.run_gibbs(call)


def gibbs_chain(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    k: int = 1,
    *,
    visible: str = "bernoulli",
    hidden: str = "bernoulli",
    sample_visible: bool = True,
    generator: torch.Generator | None = None,
    noise: GibbsNoise | None = None,
) -> GibbsChain:
    """k alternating Gibbs steps of an RBM, starting from the data ``v``.

    h0 ~ P(h | v); then k times: v_t ~ P(v | h_{t-1}), h_t ~ P(h | v_t). Returns a
    :class:`GibbsChain` ``(ph0, h0, v, v_mean, ph, h)`` with ``v``, ``v_mean``, ``ph``, ``h``
    from the last step. ``visible`` and ``hidden`` pick each layer's unit type (not both
    Gaussian); ``sample_visible=False`` uses the visible means as the state (mean-field
    reconstructions, as Hinton's CD-1 code does). ``k`` in [1, 10000]. ``generator`` (on
    v's device) seeds the sampling (under ``torch.compile(fullgraph=True)`` a generator
    argument is a graph break: seed with ``torch.manual_seed`` there); ``noise`` supplies
    the random numbers explicitly (then no ``generator``).

    Fused kernels: GEMMs through ATen (BLAS / cuBLAS), then one pass per GEMM output that
    adds the bias, applies the mean function and samples with Philox, no noise tensor made.
    """
    return _run_gibbs(
        "gibbs_chain", v, W, b_v, b_h, k=k, chain=None, visible=visible, hidden=hidden,
        sample_visible=sample_visible, generator=generator, noise=noise,
    )  # fmt: skip


def cd_step(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    k: int = 1,
    *,
    chain: Tensor | None = None,
    visible: str = "bernoulli",
    hidden: str = "bernoulli",
    sample_visible: bool = True,
    generator: torch.Generator | None = None,
    noise: GibbsNoise | None = None,
) -> CDStats:
    """Contrastive-divergence statistics for one batch; returns :class:`CDStats`.

    CD-k (``chain=None``): the negative chain starts from h0 ~ P(h | v) and runs k Gibbs
    steps. PCD-k: it starts from ``chain`` (Bc, H), the hidden states returned by the
    previous call (``CDStats.chain``; Bc may differ from B; start it e.g. from zeros or
    from ``gibbs_chain(v, ...).h0``). ``dW``, ``db_v``, ``db_h`` are positive minus negative
    statistics averaged over each phase's batch, i.e. ascent directions: ``W += lr * dW``.
    Other arguments as :func:`gibbs_chain`.

    Fused kernels: five GEMMs (the last two write dW with one accumulating BLAS call);
    bias + mean + Philox sampling in one pass per GEMM output, with the column sums for
    db_v / db_h and the reconstruction error accumulated in those same passes.
    """
    return _run_gibbs(
        "cd_step", v, W, b_v, b_h, k=k, chain=chain, visible=visible, hidden=hidden,
        sample_visible=sample_visible, generator=generator, noise=noise,
    )  # fmt: skip


def kl_sparsity(h: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """β · Σ_j KL(ρ ‖ ρ̂_j) with ρ̂_j = mean_i h_ij, as a 0-d tensor of h's dtype.

    ``h`` (B, H) holds activations in [0, 1] (B >= 1); ``rho`` in (0, 1); ``beta`` >= 0.
    ρ̂ is clamped to [KL_EPS, 1 - KL_EPS] = [1e-6, 1 - 1e-6] so dead or saturated units
    give a finite penalty; where the clamp is active the gradient is zero (as
    torch.clamp's). Differentiable in h. The gradient is the same for every row, so the
    fused backward computes one row (O(H), no read of h) and returns it broadcast to
    (B, H) with stride 0 along the rows, as torch's own ``sum`` backward does.
    """
    rho, beta = check.kl_args(h, rho, beta)
    if fused(h):
        return _fused.kl_sparsity(h, rho, beta)
    return reference.kl(h, rho, beta)


def topk_sparsify(z: Tensor, k: int) -> Tensor:
    """Keeps the k largest entries of each row of ``z`` (B, D) and zeroes the rest.

    ``k`` in [1, D]. NaN counts as the largest value (as in torch.topk); among equal
    values the fused kernels keep the lower column index. Differentiable: the gradient
    reaches the kept entries only. The result is a new contiguous tensor. float32 and
    float64 run the fused kernels; float16 / bfloat16 (a 16-bit SAE's code) the reference.
    """
    k = check.topk_args(z, k)
    if z.dtype in check.FLOAT_DTYPES and fused(z):
        return _fused.topk_sparsify(z, k)
    return reference.topk(z, k)[0]


def _fused_sae(t: Tensor) -> bool:
    """The sparse SAE kernels: float32/64 on the CPU, also 16-bit floats on CUDA."""
    if t.device.type == "cpu" and t.dtype not in check.FLOAT_DTYPES:
        return False
    return fused(t)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    straight_through: bool = False,
    aux_k: int = 0,
    dead: Tensor | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, ...]:
    """A top-k SAE encoder: each row's k largest of ``relu((x - b_dec) W_enc^T + b_enc)``.

    ``x`` (B, d), ``W_enc`` (n, d), ``b_enc`` (n,), ``b_dec`` (d,), ``k`` in [1, n]; float32
    or float64, on CUDA also float16 / bfloat16 (float32 accumulation). Returns
    ``(values, indices)``, both (B, k), best first (values ReLU'd, so a row with fewer than
    k positive pre-activations has zeros at its end). Ties keep the lower latent index in
    the fused kernels. Differentiable in x, W_enc, b_enc and b_dec. ``straight_through``:
    the gradient of every kept value reaches its pre-activation, positive or not (a ReLU
    forward, the identity backward: AuxK's way back for latents that never fire).

    AuxK: with ``dead``, a bool mask (n,) of the latents to revive, the result is
    ``(values, indices, aux_values, aux_indices)``: also each row's ``aux_k`` largest
    pre-activations among the dead latents (values ReLU'd, gradient straight-through),
    chosen from the same tiles as the main code, so it costs no second GEMM; one
    backward serves both codes. The AuxK code is always ``aux_k`` wide: with fewer dead
    latents, the columns past their number are padding (value 0 at latent 0, no
    gradient), so shapes never depend on the mask's contents (no host sync; compiles).

    Fused kernels: the pre-activations are computed a tile of latents at a time (a BLAS
    GEMM per tile) and merged into each row's running top-k, so memory is O(B·tile + B·k),
    never O(B·n); a NaN or infinite pre-activation raises (on CUDA k <= 256, else the
    reference runs; an AuxK k past 256 is taken from the dead latents' pre-activations,
    (B, dead.sum()), beside the fused main code). The backward touches only the
    kept (row, latent) pairs: the gradient of W_enc is accumulated per latent after a
    counting sort of the pairs (deterministic, no atomics).

    ``check_finite=False``: no raise, every value (AuxK's too) NaN instead; raising reads
    a flag back, on CUDA a wait mid-step, which a step that checks its loss anyway skips.
    """
    k = check.topk_encode_args(x, W_enc, b_enc, b_dec, k)
    if not isinstance(straight_through, bool):
        raise ConfigError(f"topk_encode: straight_through must be a bool, got {straight_through!r}")
    if not isinstance(check_finite, bool):
        raise ConfigError(f"topk_encode: check_finite must be a bool, got {check_finite!r}")
    aux_k = check.aux_args(x, W_enc, aux_k, dead)
    limit = topk_encode_max_k(x)
    if not _fused_sae(x) or k > limit:
        return reference.sparse_code(
            x, W_enc, b_enc, b_dec, k, straight_through, aux_k, dead, check_finite
        )
    if aux_k <= limit:
        return _fused.encode_or_refuse(
            x, W_enc, b_enc, b_dec, k, straight_through, aux_k, dead, check_finite
        )
    # AuxK's k past the device's heaps (d / 2 at large d): the main code fused, AuxK's
    # from the dead latents' pre-activations alone, never the whole (B, n) matrix
    values, indices = _fused.encode_or_refuse(
        x, W_enc, b_enc, b_dec, k, straight_through, 0, None, check_finite
    )
    index = dead.nonzero().flatten()
    aux_values, local = reference.sparse_code(
        x, W_enc[index], b_enc[index], b_dec, min(aux_k, len(index)), straight_through=True
    )
    return values, indices, *reference.pad_aux(aux_values, index[local], aux_k)


def topk_encode_max_k(x: Tensor) -> int | float:
    """The largest k the fused streaming :func:`topk_encode` keeps per row on x's device
    (its heaps' size on CUDA; no limit on the CPU); a larger k runs the reference."""
    return CUDA_TOPK_ENCODE_MAX_K if x.device.type == "cuda" else math.inf


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, check_indices: bool = True
) -> Tensor:
    """A sparse code's reconstruction: ``b_dec + sum_j values[:, j] * W_dec[indices[:, j]]``.

    ``values`` (B, m) float and ``indices`` (B, m) int64 in [0, n) (e.g. from
    :func:`topk_encode`), ``W_dec`` (n, d), ``b_dec`` (d,); returns (B, d). Differentiable
    in values, W_dec and b_dec. Fused kernels: a gather-sum per row; backward: dot
    products for the values and a per-latent accumulation (counting sort, deterministic,
    no atomics) for W_dec. The kernels skip entries whose value is 0 (a top-k code's
    padding), so a non-finite dictionary row picked with value 0 adds nothing, where the
    reference's 0 * inf gives NaN. ``check_indices=False`` skips the range check (on CUDA
    it waits for the device), for indices :func:`topk_encode` made.
    """
    check.sparse_decode_args(values, indices, W_dec, b_dec, check_indices)
    if _fused_sae(values):
        return _fused.sparse_decode(values, indices, W_dec, b_dec)
    return reference.gather_decode(values, indices, W_dec, b_dec)


@torch.no_grad()
def remove_parallel_(grad: Tensor, weight: Tensor) -> None:
    """Removes from each row of ``grad`` its component along the same row of ``weight``
    (both (n, d)), in place: with rows held at a fixed norm, that component would only
    change the norm. Rows of zeros are left alone. One row-local pass on the fused
    kernels (the reference: about seven passes over the matrix)."""
    check.rows_args("remove_parallel_", "grad", weight=weight, grad=grad)
    if _fused_sae(grad) and grad.is_contiguous():
        torch.ops.aecore.remove_parallel_(grad, weight.detach())
        # the kernels write through pointers: bump the version as torch's in-place ops
        # do, so that autograd refuses a backward that saved the old values
        increment_version(grad)
    else:
        reference.project_out_(grad, weight)


@torch.no_grad()
def set_row_norms_(weight: Tensor, norm: float) -> None:
    """Scales each row of ``weight`` (n, d) to L2 norm ``norm`` (> 0), in place; rows
    of zeros stay zero."""
    check.rows_args("set_row_norms_", "weight", weight=weight)
    norm = check.positive("set_row_norms_", "norm", norm)
    if _fused_sae(weight) and weight.is_contiguous():
        torch.ops.aecore.set_row_norms_(weight.detach(), norm)
        increment_version(weight)
    else:
        reference.scale_rows_(weight, norm)
