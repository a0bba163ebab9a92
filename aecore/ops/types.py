"""What the ops return and take besides tensors, shared by the fused kernels, the
reference and the argument checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

#: ρ̂ is clamped to [KL_EPS, 1 - KL_EPS] before the logs (same constant as csrc/).
KL_EPS = 1e-6
#: RBM unit types: Bernoulli (sigmoid means, 0/1 samples) or unit-variance Gaussian
#: (linear means, mean + N(0, 1) samples)
UNITS = ("bernoulli", "gaussian")


class GibbsChain(NamedTuple):
    """What :func:`aecore.ops.gibbs_chain` returns (all of v's dtype and device).

    ``ph0`` (B, H): E[h | v] for the data (the positive-phase hidden means; P(h=1 | v)
    for Bernoulli units); ``h0`` (B, H): a sample of it (the chain's first hidden state);
    ``v`` (B, V): the final visible state (a sample, or the means if ``sample_visible`` is
    False); ``v_mean`` (B, V): the final visible means (sigmoid for Bernoulli units,
    ``h W^T + b_v`` for Gaussian ones); ``ph`` (B, H): the final hidden means; ``h``
    (B, H): a sample of ``ph`` (the next chain state).
    """

    ph0: Tensor
    h0: Tensor
    v: Tensor
    v_mean: Tensor
    ph: Tensor
    h: Tensor


class CDStats(NamedTuple):
    """What :func:`aecore.ops.cd_step` returns: gradient *ascent* directions of the
    log-likelihood.

    ``dW`` (V, H) = v^T ph0 / B - v_k^T ph_k / Bc; ``db_v`` (V,) = mean(v) - mean(v_k);
    ``db_h`` (H,) = mean(ph0) - mean(ph_k), where v_k is the chain's final visible state
    and ph_k its final hidden means (averages over an empty batch are 0).
    ``chain`` (Bc, H): the final hidden sample; pass it back as ``chain=`` for persistent
    CD. ``recon_error`` (0-d): mean over the batch of sum_j (v - v_mean)^2, with v_mean the
    chain's last visible means for CD, and for PCD (whose chain does not reconstruct the
    batch) the mean-field reconstruction E[v | ph0].
    """

    dW: Tensor
    db_v: Tensor
    db_h: Tensor
    chain: Tensor
    recon_error: Tensor


class GibbsNoise(NamedTuple):
    """Explicit random numbers for the exact (deterministic) sampling path.

    ``h0`` (B, H): for the positive-phase hidden sample (unused, may be None, with a
    persistent chain in :func:`aecore.ops.cd_step`); ``h`` (k, Bc, H): for the hidden
    sample of each step; ``v`` (k, Bc, V): for the visible sample of each step (may be
    None when ``sample_visible`` is False). Each holds uniforms in [0, 1) for Bernoulli
    units (a unit is on iff its uniform is < its probability) and standard normals for
    Gaussian ones (the sample is mean + noise).
    """

    h0: Tensor | None
    h: Tensor
    v: Tensor | None


@dataclass(frozen=True)
class GibbsCall:
    """One validated gibbs_chain / cd_step call, as both implementations take it."""

    v: Tensor
    W: Tensor
    b_v: Tensor
    b_h: Tensor
    k: int
    chain: Tensor | None
    gaussian_visible: bool
    gaussian_hidden: bool
    sample_visible: bool
    generator: torch.Generator | None
    noise: GibbsNoise | None
    #: True for cd_step (the statistics), False for gibbs_chain (the chain's states)
    stats: bool
