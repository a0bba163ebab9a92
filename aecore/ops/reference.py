"""Plain-PyTorch reference kernels: the fallback of :mod:`aecore.ops` and its test oracle.

Every function here computes the same function as the fused op of the same name and takes
the same arguments (validated the same way). Sampling draws from ``torch.rand`` /
``torch.randn`` with the given generator, so its stream differs from the fused kernels'
Philox stream; pass ``noise=`` (:class:`GibbsNoise`) to both to compare them exactly.

Conventions (shared with the fused ops): ``v`` is ``(B, V)``, ``W`` is ``(V, H)`` (as in
Hinton's code; scikit-learn's ``components_`` is ``W.T``), ``b_v`` is ``(V,)``, ``b_h`` is
``(H,)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from aecore.ops import _validate as check

#: ρ̂ is clamped to [KL_EPS, 1 - KL_EPS] before the logs (same constant as csrc/).
KL_EPS = 1e-6


class GibbsChain(NamedTuple):
    """What :func:`gibbs_chain` returns (all of v's dtype and device).

    ``ph0`` (B, H): P(h=1 | v) for the data (the positive-phase hidden probabilities);
    ``h0`` (B, H): a Bernoulli sample of ``ph0`` (the chain's first hidden state);
    ``v`` (B, V): the final visible state (a sample, or the means if ``sample_visible`` is
    False); ``v_mean`` (B, V): the final visible means (sigmoid for Bernoulli units,
    ``h W^T + b_v`` for unit-variance Gaussian ones); ``ph`` (B, H): the final hidden
    probabilities P(h=1 | v); ``h`` (B, H): a sample of ``ph`` (the next chain state).
    """

    ph0: Tensor
    h0: Tensor
    v: Tensor
    v_mean: Tensor
    ph: Tensor
    h: Tensor


class CDStats(NamedTuple):
    """What :func:`cd_step` returns: gradient *ascent* directions of the log-likelihood.

    ``dW`` (V, H) = v^T ph0 / B - v_k^T ph_k / Bc; ``db_v`` (V,) = mean(v) - mean(v_k);
    ``db_h`` (H,) = mean(ph0) - mean(ph_k), where v_k is the chain's final visible state
    and ph_k its final hidden probabilities (averages over an empty batch are 0).
    ``chain`` (Bc, H): the final hidden sample; pass it back as ``chain=`` for persistent
    CD. ``recon_error`` (0-d): mean over the batch of sum_j (v - v_mean_k)^2 for CD; NaN
    for PCD, whose chain does not reconstruct the batch.
    """

    dW: Tensor
    db_v: Tensor
    db_h: Tensor
    chain: Tensor
    recon_error: Tensor


class GibbsNoise(NamedTuple):
    """Explicit random numbers for the exact (deterministic) sampling path.

    ``h0`` (B, H): uniforms in [0, 1) for the positive-phase hidden sample (unused, may be
    None, with a persistent chain in :func:`cd_step`); ``h`` (k, Bc, H): uniforms for the
    hidden sample of each step; ``v`` (k, Bc, V): uniforms for Bernoulli visible units or
    standard normals for Gaussian ones (may be None when ``sample_visible`` is False).
    A unit is on iff its uniform is < its probability.
    """

    h0: Tensor | None
    h: Tensor
    v: Tensor | None


def _gibbs(v, W, b_v, b_h, k, chain, gaussian, sample_visible, noise, generator, stats):
    """The shared reference body of gibbs_chain and cd_step (inputs already validated)."""
    B, H = v.shape[0], W.shape[1]
    Bc = chain.shape[0] if chain is not None else B

    def uniforms(shape):
        return torch.rand(shape, generator=generator, dtype=v.dtype, device=v.device)

    def bernoulli(p, u):
        return (u < p).to(p.dtype)

    # Same operation order as the fused kernels (GEMM, then + bias, then the mean).
    ph0 = torch.sigmoid(torch.mm(v, W) + b_h)
    h0 = None
    if chain is None or not stats:
        h0 = bernoulli(ph0, noise.h0 if noise is not None else uniforms((B, H)))
    h = chain if chain is not None else h0
    for t in range(k):
        pre = torch.mm(h, W.t()) + b_v
        v_mean = pre if gaussian else torch.sigmoid(pre)
        if not sample_visible:
            v_state = v_mean.clone()
        elif gaussian:
            z = (
                noise.v[t]
                if noise is not None
                else torch.randn(pre.shape, generator=generator, dtype=v.dtype, device=v.device)
            )
            v_state = v_mean + z
        else:
            v_state = bernoulli(v_mean, noise.v[t] if noise is not None else uniforms(pre.shape))
        ph = torch.sigmoid(torch.mm(v_state, W) + b_h)
        h = bernoulli(ph, noise.h[t] if noise is not None else uniforms((Bc, H)))
    if not stats:
        return GibbsChain(ph0, h0, v_state, v_mean, ph, h)
    inv_b = 1.0 / max(B, 1)
    inv_bc = 1.0 / max(Bc, 1)
    dW = torch.mm(v.t(), ph0) * inv_b - torch.mm(v_state.t(), ph) * inv_bc
    db_v = v.sum(0) * inv_b - v_state.sum(0) * inv_bc
    db_h = ph0.sum(0) * inv_b - ph.sum(0) * inv_bc
    if chain is None:
        recon = ((v - v_mean) ** 2).sum() * inv_b
    else:
        recon = torch.full((), float("nan"), dtype=v.dtype, device=v.device)
    return CDStats(dW, db_v, db_h, h, recon)


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
    """k alternating Gibbs steps v -> h -> v -> h (see :func:`aecore.ops.gibbs_chain`)."""
    gaussian = check.gibbs_call(
        "gibbs_chain", v, W, b_v, b_h, k, None, visible, sample_visible, generator, noise
    )
    with torch.no_grad():
        return _gibbs(v, W, b_v, b_h, k, None, gaussian, sample_visible, noise, generator, False)


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
    """CD-k / PCD-k statistics (see :func:`aecore.ops.cd_step`)."""
    gaussian = check.gibbs_call(
        "cd_step", v, W, b_v, b_h, k, chain, visible, sample_visible, generator, noise
    )
    with torch.no_grad():
        return _gibbs(v, W, b_v, b_h, k, chain, gaussian, sample_visible, noise, generator, True)


def _kl(h: Tensor, rho: float, beta: float) -> Tensor:
    # The (H,) vector math runs in float64 as in the kernels: in float32, 1 - KL_EPS is
    # off by 1% of KL_EPS, which moves the penalty of a saturated unit visibly.
    q = h.mean(0).double().clamp(KL_EPS, 1.0 - KL_EPS)
    kl = rho * torch.log(rho / q) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - q))
    return (beta * kl.sum()).to(h.dtype)


def kl_sparsity(h: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """β · Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j = mean_i h_ij clamped to [KL_EPS, 1 - KL_EPS]."""
    rho, beta = check.kl_args(h, rho, beta)
    return _kl(h, rho, beta)


def _topk(z: Tensor, k: int) -> Tensor:
    values, idx = z.topk(k, dim=1)
    return torch.zeros_like(z).scatter(1, idx, values)


def topk_sparsify(z: Tensor, k: int) -> Tensor:
    """Keeps the k largest entries of each row of z (B, D), zeroes the rest.

    Ties follow ``torch.topk`` (unspecified among equal values); the fused kernels keep
    the lower column index.
    """
    check.topk_args(z, k)
    return _topk(z, k)
