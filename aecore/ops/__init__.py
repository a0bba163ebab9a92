"""aecore.ops: the one door to aecore's kernels.

Each op runs the compiled CUDA kernels on CUDA tensors, the compiled CPU kernels on CPU
tensors, and otherwise the pure-PyTorch reference in :mod:`aecore.ops.reference` (same
function, also the test oracle). ``AECORE_DISABLE_EXT=1`` (read at import) forces the
reference; :func:`backend` says which implementation runs and why.

RBM conventions: ``v`` (B, V), ``W`` (V, H) (Hinton's layout; scikit-learn's
``components_`` is ``W.T``), ``b_v`` (V,), ``b_h`` (H,); float32 or float64, one device.

* :func:`gibbs_chain` -> :class:`GibbsChain`: k Gibbs steps v -> h -> v -> h.
* :func:`cd_step` -> :class:`CDStats`: CD-k statistics, or PCD-k with ``chain=``.
* :func:`kl_sparsity` -> 0-d tensor: β · Σ_j KL(ρ ‖ ρ̂_j), differentiable.
* :func:`topk_sparsify` -> tensor: k largest entries per row kept, differentiable.

Sampling is reproducible: the fused kernels draw from Philox-4x32-10 keyed by a seed and
an offset taken from ``generator`` (or torch's default generator), so the same seed gives
the same samples. The CPU and CUDA streams differ from each other and from the
reference's; supply :class:`GibbsNoise` to get the exact, deterministic path.

The Gibbs ops are not differentiable (their inputs are detached); kl_sparsity and
topk_sparsify are, with fused backward kernels.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from aecore.errors import ConfigError
from aecore.ops import _validate as check
from aecore.ops import reference
from aecore.ops.reference import KL_EPS, CDStats, GibbsChain, GibbsNoise

__all__ = [
    "KL_EPS",
    "OPS",
    "CDStats",
    "GibbsChain",
    "GibbsNoise",
    "backend",
    "backend_report",
    "cd_step",
    "gibbs_chain",
    "kl_sparsity",
    "reference",
    "topk_sparsify",
]

#: the public ops, in the order backend_report lists them
OPS = ("gibbs_chain", "cd_step", "kl_sparsity", "topk_sparsify")

_DISABLED = os.environ.get("AECORE_DISABLE_EXT", "").strip() not in ("", "0")


def _load(module: str) -> tuple[bool, str]:
    """Imports an extension module; returns (loaded, reason when not)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return False, "extension not built"
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. ABI mismatch with torch
        return False, f"extension failed to load: {exc}"
    return True, ""


if _DISABLED:
    _CPU = (False, "AECORE_DISABLE_EXT=1")
    _CUDA = (False, "AECORE_DISABLE_EXT=1")
else:
    _CPU = _load("aecore._C")
    if not _CPU[0]:
        _CUDA = (False, "no CUDA kernels built")
    else:
        _CUDA = _load("aecore._C_cuda")
        if not _CUDA[0] and _CUDA[1] == "extension not built":
            _CUDA = (False, "no CUDA kernels built")

#: device type -> whether its fused kernels are loaded
_FUSED = {"cpu": _CPU[0], "cuda": _CUDA[0]}


def backend(op: str, device: str | torch.device = "cpu") -> str:
    """Which implementation ``op`` runs on ``device``, and why.

    ``"fused cpu"``, ``"fused cuda"``, or ``"reference: <reason>"`` with reason one of
    ``AECORE_DISABLE_EXT=1``, ``extension not built``, ``extension failed to load: ...``,
    ``no CUDA kernels built``, ``no fused kernels for <device type>``.
    """
    if op not in OPS:
        raise ConfigError(f"backend: unknown op {op!r}; the ops are {', '.join(OPS)}")
    kind = torch.device(device).type
    if kind == "cpu":
        return "fused cpu" if _CPU[0] else f"reference: {_CPU[1]}"
    if kind == "cuda":
        return "fused cuda" if _CUDA[0] else f"reference: {_CUDA[1]}"
    return f"reference: no fused kernels for {kind}"


def backend_report() -> list[tuple[str, str, str]]:
    """(op, device, backend) for every op on every available device; never raises."""
    devices = ["cpu"]
    try:
        if torch.cuda.is_available():
            devices.append("cuda")
    except Exception:  # a broken CUDA setup must not break `aecore info`
        pass
    rows = []
    for op in OPS:
        for dev in devices:
            try:
                rows.append((op, dev, backend(op, dev)))
            except Exception as exc:
                rows.append((op, dev, f"unknown: {exc}"))
    return rows


def _fused(t: Tensor) -> bool:
    return _FUSED.get(t.device.type, False)


# --- torch.library registrations: fake (meta) kernels and autograd ----------------------

if _CPU[0]:

    @torch.library.register_fake("aecore::gibbs_chain")
    def _gibbs_chain_fake(v, W, b_v, b_h, k, gaussian, sample_visible, rng, nh0, nh, nv):
        B, V, H = v.shape[0], v.shape[1], W.shape[1]
        return tuple(v.new_empty(s) for s in ((B, H), (B, H), (B, V), (B, V), (B, H), (B, H)))

    @torch.library.register_fake("aecore::cd_step")
    def _cd_step_fake(v, W, b_v, b_h, k, chain, gaussian, sample_visible, rng, nh0, nh, nv):
        V, H = v.shape[1], W.shape[1]
        Bc = chain.shape[0] if chain is not None else v.shape[0]
        return (
            v.new_empty((V, H)),
            v.new_empty((V,)),
            v.new_empty((H,)),
            v.new_empty((Bc, H)),
            v.new_empty(()),
        )

    @torch.library.register_fake("aecore::kl_sparsity")
    def _kl_fake(h, rho, beta):
        return h.new_empty(()), h.new_empty((h.shape[1],))

    @torch.library.register_fake("aecore::kl_sparsity_backward")
    def _kl_backward_fake(grad_loss, grad_mean, mean, rows, rho, beta):
        return mean.new_empty((rows, mean.shape[0]))

    @torch.library.register_fake("aecore::topk_sparsify")
    def _topk_fake(z, k):
        return z.new_empty(z.shape), z.new_empty((z.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake("aecore::topk_sparsify_backward")
    def _topk_backward_fake(grad_out, indices):
        return grad_out.new_empty(grad_out.shape)

    def _kl_setup(ctx, inputs, output):
        h, rho, beta = inputs
        ctx.save_for_backward(output[1])
        ctx.rows, ctx.rho, ctx.beta = h.shape[0], rho, beta

    def _kl_backward(ctx, grad_loss, grad_mean):
        (mean,) = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = mean.new_zeros(())
        grad = torch.ops.aecore.kl_sparsity_backward(
            grad_loss, grad_mean, mean, ctx.rows, ctx.rho, ctx.beta
        )
        return grad, None, None

    torch.library.register_autograd("aecore::kl_sparsity", _kl_backward, setup_context=_kl_setup)

    def _topk_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _topk_backward(ctx, grad_out, _grad_indices):
        (indices,) = ctx.saved_tensors
        return torch.ops.aecore.topk_sparsify_backward(grad_out, indices), None

    torch.library.register_autograd(
        "aecore::topk_sparsify", _topk_backward, setup_context=_topk_setup
    )


# The public functions differentiate through these lean autograd.Functions (same forward
# and backward ops as the registrations above, which serve direct torch.ops.aecore users):
# torch.library's generic autograd wrapper costs ~100 us a call in Python, as much as the
# kernels themselves at typical sizes. Dynamo traces both without graph breaks.
#
# In eager mode the forward ops are also called below the Autograd dispatch key: their
# Autograd kernel is torch.library's Python wrapper (from register_autograd above), which
# for a call that records nothing only redispatches, at ~5 us a call. Under torch.compile
# (Dynamo cannot trace that guard) they are called plainly.
def _below_autograd(op, *args):
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _KLSparsity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, rho, beta):
        loss, mean = _below_autograd(torch.ops.aecore.kl_sparsity.default, h, rho, beta)
        ctx.save_for_backward(mean)
        ctx.rows, ctx.rho, ctx.beta = h.shape[0], rho, beta
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (mean,) = ctx.saved_tensors
        grad = torch.ops.aecore.kl_sparsity_backward(
            grad_loss, None, mean, ctx.rows, ctx.rho, ctx.beta
        )
        return grad, None, None


class _TopkSparsify(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, k):
        out, indices = _below_autograd(torch.ops.aecore.topk_sparsify.default, z, k)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return torch.ops.aecore.topk_sparsify_backward(grad_out, indices), None


# --- the public ops ----------------------------------------------------------------------


def _rng(v: Tensor, generator: torch.Generator | None) -> Tensor:
    """{seed, offset} for the Philox kernels, drawn from the generator (on v's device)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=v.device, generator=generator)


def _gibbs_fused(op, v, W, b_v, b_h, k, chain, gaussian, sample_visible, generator, noise):
    # not differentiable: detach what requires grad (a detach costs ~0.5 us; skip the rest)
    v, W, b_v, b_h = (t.detach() if t.requires_grad else t for t in (v, W, b_v, b_h))
    if noise is None:
        rng, nh0, nh, nv = _rng(v, generator), None, None, None
    else:
        rng = torch.zeros(2, dtype=torch.int64, device=v.device)
        nh0, nh, nv = noise.h0, noise.h, noise.v
        if not sample_visible:
            nv = None
        if op == "cd_step" and chain is not None:
            nh0 = None
    if op == "gibbs_chain":
        out = torch.ops.aecore.gibbs_chain(
            v, W, b_v, b_h, k, gaussian, sample_visible, rng, nh0, nh, nv
        )
        return GibbsChain(*out)
    if chain is not None and chain.requires_grad:
        chain = chain.detach()
    out = torch.ops.aecore.cd_step(
        v, W, b_v, b_h, k, chain, gaussian, sample_visible, rng, nh0, nh, nv
    )
    return CDStats(*out)


def gibbs_chain(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    k: int = 1,
    *,
    visible: str = "bernoulli",
    sample_visible: bool = True,
    generator: torch.Generator | None = None,
    noise: GibbsNoise | None = None,
) -> GibbsChain:
    """k alternating Gibbs steps of an RBM, starting from the data ``v``.

    h0 ~ P(h | v); then k times: v_t ~ P(v | h_{t-1}), h_t ~ P(h | v_t). Returns a
    :class:`GibbsChain` ``(ph0, h0, v, v_mean, ph, h)`` with ``v``, ``v_mean``, ``ph``, ``h``
    from the last step. ``visible`` picks Bernoulli (sigmoid) or unit-variance Gaussian
    visible units; ``sample_visible=False`` uses the visible means as the state (mean-field
    reconstructions, as Hinton's CD-1 code does). ``k`` in [1, 10000]. ``generator`` (on v's
    device) seeds the sampling; ``noise`` supplies the random numbers explicitly.

    Fused kernels: GEMMs through ATen (BLAS / cuBLAS), then one pass per GEMM output that
    adds the bias, applies the sigmoid and samples with Philox, no uniform tensor made.
    """
    gaussian = check.gibbs_call(
        "gibbs_chain", v, W, b_v, b_h, k, None, visible, sample_visible, generator, noise
    )
    if _fused(v):
        return _gibbs_fused(
            "gibbs_chain", v, W, b_v, b_h, k, None, gaussian, sample_visible, generator, noise
        )
    with torch.no_grad():
        return reference._gibbs(
            v, W, b_v, b_h, k, None, gaussian, sample_visible, noise, generator, False
        )


def cd_step(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    k: int = 1,
    *,
    chain: Tensor | None = None,
    visible: str = "bernoulli",
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
    bias + sigmoid + Philox sampling in one pass per GEMM output, with the column sums for
    db_v / db_h and the reconstruction error accumulated in those same passes.
    """
    gaussian = check.gibbs_call(
        "cd_step", v, W, b_v, b_h, k, chain, visible, sample_visible, generator, noise
    )
    if _fused(v):
        return _gibbs_fused(
            "cd_step", v, W, b_v, b_h, k, chain, gaussian, sample_visible, generator, noise
        )
    with torch.no_grad():
        return reference._gibbs(
            v, W, b_v, b_h, k, chain, gaussian, sample_visible, noise, generator, True
        )


def kl_sparsity(h: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """β · Σ_j KL(ρ ‖ ρ̂_j) with ρ̂_j = mean_i h_ij, as a 0-d tensor of h's dtype.

    ``h`` (B, H) holds activations in [0, 1] (B >= 1); ``rho`` in (0, 1); ``beta`` >= 0.
    ρ̂ is clamped to [KL_EPS, 1 - KL_EPS] = [1e-6, 1 - 1e-6] so dead or saturated units
    give a finite penalty; where the clamp is active the gradient is zero (as
    torch.clamp's). Differentiable in h; the fused backward writes the gradient in one pass
    (it is the same for every row, so it needs no read of h).
    """
    rho, beta = check.kl_args(h, rho, beta)
    if _fused(h):
        if h.requires_grad and torch.is_grad_enabled():
            return _KLSparsity.apply(h, rho, beta)
        return _below_autograd(torch.ops.aecore.kl_sparsity.default, h, rho, beta)[0]
    return reference._kl(h, rho, beta)


def topk_sparsify(z: Tensor, k: int) -> Tensor:
    """Keeps the k largest entries of each row of ``z`` (B, D) and zeroes the rest.

    ``k`` in [1, D]. NaN counts as the largest value (as in torch.topk); among equal
    values the fused kernels keep the lower column index. Differentiable: the gradient
    reaches the kept entries only. The result is a new contiguous tensor.
    """
    check.topk_args(z, k)
    if _fused(z):
        if z.requires_grad and torch.is_grad_enabled():
            return _TopkSparsify.apply(z, k)
        return _below_autograd(torch.ops.aecore.topk_sparsify.default, z, k)[0]
    return reference._topk(z, k)
