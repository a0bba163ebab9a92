"""Plain-PyTorch reference kernels: the fallback of :mod:`aecore.ops` and its test oracle.

Every public function here computes the same function as the fused op of the same name,
takes the same arguments and validates them the same way. Sampling draws from
``torch.rand`` / ``torch.randn`` with the given generator, so its stream differs from
the fused kernels' Philox stream; pass ``noise=`` (:class:`GibbsNoise`) to both to
compare them exactly.

Conventions (shared with the fused ops): ``v`` is ``(B, V)``, ``W`` is ``(V, H)`` (as in
Hinton's code; scikit-learn's ``components_`` is ``W.T``), ``b_v`` is ``(V,)``, ``b_h`` is
``(H,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aecore.errors import ConfigError, NonFiniteError
from aecore.ops import adam_args
from aecore.ops import validation as check
from aecore.ops.types import KL_EPS, CDStats, GibbsCall, GibbsChain, GibbsNoise

__all__ = [
    "KL_EPS", "CDStats", "GibbsChain", "GibbsNoise", "cd_step", "cd_update_", "gibbs_chain",
]  # fmt: skip


def run_gibbs(c: GibbsCall) -> GibbsChain | CDStats:
    """The reference body of gibbs_chain and cd_step, for a validated call."""
    v, W, b_v, b_h = c.v, c.W, c.b_v, c.b_h
    B = v.shape[0]
    Bc = c.chain.shape[0] if c.chain is not None else B
    noise = c.noise

    def sample(mean: Tensor, gaussian: bool, given: Tensor | None) -> Tensor:
        """Bernoulli: 1 where a uniform < mean; Gaussian: mean + a standard normal."""
        if given is None:
            draw = torch.randn if gaussian else torch.rand
            given = draw(mean.shape, generator=c.generator, dtype=v.dtype, device=v.device)
        return mean + given if gaussian else (given < mean).to(mean.dtype)

    def mean_of(pre: Tensor, gaussian: bool) -> Tensor:
        return pre if gaussian else torch.sigmoid(pre)

    # Same operation order as the fused kernels (GEMM, then + bias, then the mean).
    ph0 = mean_of(torch.mm(v, W) + b_h, c.gaussian_hidden)
    h0 = None
    if c.chain is None or not c.stats:
        h0 = sample(ph0, c.gaussian_hidden, noise.h0 if noise is not None else None)
    h = c.chain if c.chain is not None else h0
    for t in range(c.k):
        v_mean = mean_of(torch.mm(h, W.t()) + b_v, c.gaussian_visible)
        if c.sample_visible:
            v_state = sample(v_mean, c.gaussian_visible, noise.v[t] if noise is not None else None)
        else:
            v_state = v_mean.clone()
        ph = mean_of(torch.mm(v_state, W) + b_h, c.gaussian_hidden)
        h = sample(ph, c.gaussian_hidden, noise.h[t] if noise is not None else None)
    if not c.stats:
        return GibbsChain(ph0, h0, v_state, v_mean, ph, h)
    inv_b = 1.0 / max(B, 1)
    inv_bc = 1.0 / max(Bc, 1)
    dW = torch.mm(v.t(), ph0) * inv_b - torch.mm(v_state.t(), ph) * inv_bc
    db_v = v.sum(0) * inv_b - v_state.sum(0) * inv_bc
    db_h = ph0.sum(0) * inv_b - ph.sum(0) * inv_bc
    if c.chain is not None:  # the mean-field reconstruction of the batch (see CDStats)
        v_mean = mean_of(torch.mm(ph0, W.t()) + b_v, c.gaussian_visible)
    recon = ((v - v_mean) ** 2).sum() * inv_b
    return CDStats(dW, db_v, db_h, h, recon)


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
    """k alternating Gibbs steps v -> h -> v -> h (see :func:`aecore.ops.gibbs_chain`)."""
    call = check.gibbs_call(
        "gibbs_chain", v, W, b_v, b_h, k=k, chain=None, visible=visible, hidden=hidden,
        sample_visible=sample_visible, generator=generator, noise=noise,
    )  # fmt: skip
    with torch.no_grad():
        return run_gibbs(call)


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
    """CD-k / PCD-k statistics (see :func:`aecore.ops.cd_step`)."""
    call = check.gibbs_call(
        "cd_step", v, W, b_v, b_h, k=k, chain=chain, visible=visible, hidden=hidden,
        sample_visible=sample_visible, generator=generator, noise=noise,
    )  # fmt: skip
    with torch.no_grad():
        return run_gibbs(call)


def kl(h: Tensor, rho: float, beta: float) -> Tensor:
    """The KL penalty for validated arguments."""
    # The (H,) vector math runs in float64 as in the kernels: in float32, 1 - KL_EPS is
    # off by 1% of KL_EPS, which moves the penalty of a saturated unit visibly.
    q = h.mean(0).double().clamp(KL_EPS, 1.0 - KL_EPS)
    terms = rho * torch.log(rho / q) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - q))
    return (beta * terms.sum()).to(h.dtype)


def kl_sparsity(h: Tensor, rho: float, beta: float = 1.0) -> Tensor:
    """β · Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j = mean_i h_ij clamped to [KL_EPS, 1 - KL_EPS]."""
    rho, beta = check.kl_args(h, rho, beta)
    return kl(h, rho, beta)


def topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k-sparse rows and the kept indices, for validated arguments; plain ATen ops,
    so this is also what a k-sparse code exports to ONNX as (TopK + ScatterElements)."""
    values, indices = z.topk(k, dim=1)
    return torch.zeros_like(z).scatter(1, indices, values), indices


def topk_sparsify(z: Tensor, k: int) -> Tensor:
    """Keeps the k largest entries of each row of z (B, D), zeroes the rest.

    Ties follow ``torch.topk`` (unspecified among equal values); the fused kernels keep
    the lower column index.
    """
    check.topk_args(z, k)
    return topk(z, k)[0]


def _straight_through_relu(values: Tensor) -> Tensor:
    """ReLU forward, identity backward."""
    return values + (values.relu() - values).detach()


def aux_code(pre: Tensor, dead: Tensor, aux_k: int) -> tuple[Tensor, Tensor]:
    """AuxK's code from the (B, n) pre-activations: each row's ``aux_k`` largest among the
    latents ``dead`` marks, ReLU'd with the identity backward (a latent whose
    pre-activations went negative on every input would otherwise get no gradient and
    could never come back). Past the number of dead latents, padding: value 0 at latent
    0, without gradient. Shapes never depend on the mask's contents (it compiles, and
    runs on meta tensors)."""
    values, indices = pre.masked_fill(~dead, -math.inf).topk(aux_k, dim=1)
    chosen = values > -math.inf  # the slots no dead latent filled hold the fill
    values = _straight_through_relu(values.where(chosen, 0))
    return values, indices.where(chosen, 0)


def pad_aux(values: Tensor, indices: Tensor, aux_k: int) -> tuple[Tensor, Tensor]:
    """An AuxK code of fewer than ``aux_k`` columns padded as :func:`aux_code` pads."""
    missing = aux_k - values.shape[1]
    return F.pad(values, (0, missing)), F.pad(indices, (0, missing))


def aux_gate(dead: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Ones over an AuxK code of ``shape`` (B, aux_k) but zeros on its padding (the
    columns past the number of latents ``dead`` marks): the backward's gate, from the
    mask alone, without reading the count on the host."""
    columns = torch.arange(shape[1], device=dead.device)
    return (columns < dead.sum()).to(dtype).expand(shape)


def sparse_code(
    x,
    W_enc,
    b_enc,
    b_dec,
    k: int,
    straight_through: bool = False,
    aux_k: int = 0,
    dead=None,
    check_finite: bool = False,
):
    """topk_encode's body, for validated arguments; ``check_finite``: the kernels'
    refusal of any non-finite pre-activation (-inf too, which no top-k keeps)."""
    pre = F.linear(x - b_dec, W_enc, b_enc)
    if check_finite and not bool(torch.isfinite(pre).all()):
        raise NonFiniteError(
            "topk_encode met a NaN or infinite pre-activation: x, W_enc, b_enc or b_dec "
            "holds non-finite values (or they overflow)"
        )
    values, indices = pre.topk(k, dim=1)
    values = _straight_through_relu(values) if straight_through else values.relu()
    if dead is None:
        return values, indices
    return values, indices, *aux_code(pre, dead, aux_k)


def gather_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """sparse_decode's body, for validated arguments."""
    if values.shape[1] == 0:
        return b_dec.expand(len(values), -1).clone()
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


def topk_encode(
    x,
    W_enc,
    b_enc,
    b_dec,
    k: int,
    *,
    straight_through: bool = False,
    aux_k: int = 0,
    dead=None,
    check_finite: bool = True,
):
    """Each row's k largest pre-activations ``(x - b_dec) W_enc^T + b_enc``, ReLU'd, as
    ``(values, indices)`` (B, k), best first; with ``dead``, also the ``aux_k`` largest
    among the dead latents (straight-through; see :func:`aux_code`); the dense (B, n)
    pre-activations are made."""
    check.topk_encode_args(x, W_enc, b_enc, b_dec, k)
    aux_k = check.aux_args(x, W_enc, aux_k, dead)
    return sparse_code(x, W_enc, b_enc, b_dec, k, straight_through, aux_k, dead, check_finite)


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, check_indices: bool = True
) -> Tensor:
    """``b_dec + sum_j values[:, j] * W_dec[indices[:, j]]`` (B, d), from the gathered
    rows (B, k, d): memory ``gather_decode``'s embedding bag avoids, for a function that
    differentiates twice (the fused op's backward, and the embedding bag's, do not)."""
    check.sparse_decode_args(values, indices, W_dec, b_dec, check_indices)
    return torch.einsum("bk,bkd->bd", values, W_dec[indices]) + b_dec


@torch.no_grad()
def remove_parallel_(grad: Tensor, weight: Tensor) -> None:
    """``grad[r] -= (<grad[r], w[r]> / |w[r]|^2) w[r]`` in place (rows of zeros alone)."""
    check.rows_args("remove_parallel_", "grad", weight=weight, grad=grad)
    project_out_(grad, weight)


@torch.no_grad()
def project_out_(grad: Tensor, weight: Tensor) -> None:
    """remove_parallel_'s body, for validated arguments."""
    sq = (weight * weight).sum(1, keepdim=True)
    coef = (grad * weight).sum(1, keepdim=True) / torch.where(sq > 0, sq, torch.ones_like(sq))
    grad.sub_(coef * weight)


@torch.no_grad()
def set_row_norms_(weight: Tensor, norm: float) -> None:
    """``w[r] *= norm / |w[r]|`` in place (rows of zeros alone)."""
    check.rows_args("set_row_norms_", "weight", weight=weight)
    scale_rows_(weight, check.positive("set_row_norms_", "norm", norm))


@torch.no_grad()
def scale_rows_(weight: Tensor, norm: float) -> None:
    """set_row_norms_'s body, for validated arguments."""
    length = weight.norm(dim=1, keepdim=True)
    weight.mul_(torch.where(length > 0, norm / length, torch.ones_like(length)))


@torch.no_grad()
def momentum_step_(
    params: list[Tensor],
    velocities: list[Tensor],
    steps: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: list[float] | None = None,
) -> Tensor:
    """``v = momentum v + lr (step - weight_decay p)``, ``p += v`` for each entry, unless
    some step is not finite (then nothing changes); returns whether it applied."""
    decay = check.weight_decays(
        weight_decay, len(params) if isinstance(params, (list, tuple)) else 0
    )
    check.momentum_step_args(params, velocities, steps, lr, momentum, decay)
    return momentum_update_(params, velocities, steps, lr, momentum, decay)


@torch.no_grad()
def momentum_update_(params, velocities, steps, lr, momentum, weight_decay) -> Tensor:
    """momentum_step_'s body, for validated arguments."""
    ok = torch.stack([torch.isfinite(s).all() for s in steps]).all()
    if not bool(ok):
        return ok
    for p, v, s, decay in zip(params, velocities, steps, weight_decay):
        v.mul_(momentum).add_(s, alpha=lr)
        if decay:
            v.add_(p, alpha=-lr * decay)
        p.add_(v)
    return ok


@torch.no_grad()
def run_cd_update(
    c: GibbsCall, velocities, lr: float, momentum: float, weight_decay: float, statistics=None
) -> tuple[Tensor, Tensor]:
    """The reference body of cd_update_, for a validated call: the statistics
    (``statistics(c)``, by default run_gibbs), momentum_step_ on (W, b_v, b_h), then the
    PCD chain advanced, unless a statistic is not finite."""
    stats = (statistics or run_gibbs)(c)
    applied = momentum_update_(
        [c.W, c.b_v, c.b_h], list(velocities), [stats.dW, stats.db_v, stats.db_h],
        lr, momentum, [weight_decay, 0.0, 0.0],
    )  # fmt: skip
    if c.chain is not None and bool(applied):
        c.chain.copy_(stats.chain)
    return stats.recon_error, applied


def cd_update_(v, W, b_v, b_h, velocities, lr, momentum, weight_decay=0.0, k=1, **kwargs):
    """One CD-k / PCD-k training step in place (see :func:`aecore.ops.cd_update_`)."""
    call, velocities, lr, momentum, weight_decay = check.cd_update_args(
        v, W, b_v, b_h, velocities, lr, momentum, weight_decay, k, **kwargs
    )
    return run_cd_update(call, velocities, lr, momentum, weight_decay)


@torch.no_grad()
def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    decoupled: bool = False,
    max_norm: float | None = None,
) -> Tensor:
    """torch.optim.Adam's step (AdamW's with ``decoupled``) after clipping the gradients
    to a total norm of ``max_norm``, unless that norm is not finite (then nothing
    changes); returns the norm before clipping (float64)."""
    hyper = adam_args.adam_hyperparameters(lr, betas, eps, weight_decay, max_norm)
    adam_args.adam_step_args(params, grads, exp_avgs, exp_avg_sqs, steps)
    return adam_update_(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper, decoupled)


@torch.no_grad()
def adam_update_(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
    max_norm, decoupled,
) -> Tensor:  # fmt: skip
    """adam_step_'s body, for validated arguments."""
    squares = torch.stack([g.double().square().sum() for g in grads]).sum()
    norm = squares.sqrt()
    counts = [float(s) + 1.0 for s in steps]
    if not all(math.isfinite(t) and t >= 1.0 for t in counts):  # (NaN fails t >= 1 too)
        raise ConfigError(
            f"adam_step_: step counts must be finite numbers >= 0, got {[t - 1 for t in counts]}"
        )
    if float(squares) > torch.finfo(params[0].dtype).max:  # as torch's norm in that dtype
        norm = torch.full_like(norm, math.inf)
    if not bool(torch.isfinite(norm)):
        return norm
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (float(norm) + 1e-6))
    for p, g, m, v, s, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, counts):
        g = g * scale
        if decoupled:
            p.mul_(1.0 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * p
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt() / math.sqrt(1.0 - beta2**t) + eps
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
        s.fill_(t)
    return norm
