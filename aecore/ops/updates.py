"""The in-place training updates: those of models with their own update rule (the
RBM's), :func:`momentum_step_`, :func:`cd_update_` (a whole CD / PCD step in one call)
and :func:`cd_update_own_` (the same for a model's own, already checked operands); and
the optimizer's, :func:`adam_step_` (and :func:`adam_step_own_`, for the trainer's own
optimizer state). The kernels check their operands before changing anything, so the
Python checks of momentum_step_ and the ``_own_`` variants, which cost a real part of
a small model's step, run only where the kernels refuse a call, to explain it;
cd_update_ checks first, as the other ops do."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from aecore.ops import _fused, adam_args, reference
from aecore.ops import validation as check
from aecore.ops._extension import fused
from aecore.ops.types import UNITS, GibbsCall, GibbsNoise


@torch.no_grad()
def momentum_step_(
    params: list[Tensor],
    velocities: list[Tensor],
    steps: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: list[float] | None = None,
) -> Tensor:
    """For each (parameter, velocity, step), in place:
    ``v = momentum * v + lr * (step - weight_decay * p)``; ``p += v`` (``step`` an
    ascent direction, e.g. :func:`cd_step`'s statistics). If some step holds a NaN or an
    infinity nothing changes. Returns whether the update applied, as a bool scalar on
    the parameters' device (reading it on CUDA waits for the kernels).

    ``weight_decay``: one per parameter (default 0 for all). On the fused kernels: a
    finiteness check of the steps, then one pass per parameter (float32/64, contiguous
    parameters and velocities); otherwise the reference.
    """
    if not (isinstance(params, (list, tuple)) and params):  # refused with the checks' words
        check.momentum_step_args(params, velocities, steps, lr, momentum, [])
    decay = check.weight_decays(weight_decay, len(params))
    numbers = check.is_real(lr) and check.is_real(momentum)
    frozen = check.any_inference_tensor(params, velocities)
    if numbers and params and isinstance(params[0], Tensor) and fused(params[0]) and not frozen:
        # The kernels check their operands before changing anything; the Python checks
        # (which would cost more than the update at RBM sizes) only explain a refusal
        try:
            applied = torch.ops.aecore.momentum_step_(
                params, velocities, steps, float(lr), float(momentum), decay
            )
            increment_version([*params, *velocities])
            return applied
        except (RuntimeError, TypeError, ValueError):
            if all(t.is_contiguous() for t in (*params, *velocities)):
                check.momentum_step_args(params, velocities, steps, lr, momentum, decay)
                raise
            # non-contiguous operands: the reference below, after the same checks
    check.momentum_step_args(params, velocities, steps, lr, momentum, decay)
    return reference.momentum_update_(params, velocities, steps, lr, momentum, decay)


def cd_update_own_(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    velocities: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    k: int,
    *,
    chain: Tensor | None,
    visible: str,
    hidden: str,
    sample_visible: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`cd_update_` for a model that updates its own parameters with rows it has
    checked (the RBM's ``train_step``): the same step, without the argument checks in
    Python, which cost as much as a tenth of a small RBM's step. The kernels check the
    shapes, dtypes, devices and contiguity themselves; where they refuse the call, or
    do not run on v's device, this is :func:`cd_update_`, checks and fallbacks and all
    (a refused call changes nothing). The units and numbers must be valid: the model
    checked them when it was built; what the kernels do not check is checked here."""
    units = visible in UNITS and hidden in UNITS and not visible == hidden == "gaussian"
    steps = type(k) is int and 1 <= k <= check.MAX_GIBBS_STEPS
    # (strided parameters take cd_update_'s reference update: decided before the seed is
    # drawn, so that the samples are those cd_update_ draws)
    contiguous = all(t.is_contiguous() for t in (W, b_v, b_h, *velocities))
    frozen = check.any_inference_tensor([W, b_v, b_h, chain], velocities)
    if fused(v) and units and steps and contiguous and not frozen:
        call = GibbsCall(
            v=v, W=W, b_v=b_v, b_h=b_h, k=k, chain=chain,
            gaussian_visible=visible == "gaussian", gaussian_hidden=hidden == "gaussian",
            sample_visible=sample_visible, generator=None, noise=None, stats=True,
        )  # fmt: skip
        # (train_step runs without grad already: entering no_grad costs a few µs)
        quiet = torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
        try:
            with quiet:
                return _fused.cd_update_(call, velocities, lr, momentum, weight_decay)
        except (RuntimeError, TypeError):
            pass  # cd_update_'s checks name what is wrong, or it runs the reference
    return cd_update_(
        v, W, b_v, b_h, velocities, lr, momentum, weight_decay, k, chain=chain,
        visible=visible, hidden=hidden, sample_visible=sample_visible,
    )  # fmt: skip


@torch.no_grad()
def cd_update_(
    v: Tensor,
    W: Tensor,
    b_v: Tensor,
    b_h: Tensor,
    velocities: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    k: int = 1,
    *,
    chain: Tensor | None = None,
    visible: str = "bernoulli",
    hidden: str = "bernoulli",
    sample_visible: bool = True,
    generator: torch.Generator | None = None,
    noise: GibbsNoise | None = None,
) -> tuple[Tensor, Tensor]:
    """One CD-k / PCD-k training step, in place: :func:`cd_step`'s statistics, then
    :func:`momentum_step_` on ``(W, b_v, b_h)`` with ``velocities`` (their three
    velocities, same shapes) and ``weight_decay`` on W alone, then, for PCD, ``chain``
    advanced to the chain's new hidden states. If a statistic holds a NaN or an infinity
    nothing changes. Returns ``(recon_error, applied)``: :class:`CDStats`'s monitor and
    whether the update applied (a bool scalar on v's device; reading it on CUDA waits
    for the kernels). Other arguments as :func:`cd_step`.

    The same step as those three calls, with the same samples for the same generator
    state; fused, it is one call into the kernels (at RBM sizes like 64x64x256 each
    call's overhead is a real part of a step). With W, b_v, b_h or a velocity not
    contiguous it is those three calls.
    """
    call, velocities, lr, momentum, weight_decay = check.cd_update_args(
        v, W, b_v, b_h, velocities, lr, momentum, weight_decay, k, chain=chain,
        visible=visible, hidden=hidden, sample_visible=sample_visible, generator=generator,
        noise=noise,
    )  # fmt: skip
    if not fused(v):
        return reference.run_cd_update(call, velocities, lr, momentum, weight_decay)
    if all(t.is_contiguous() for t in (W, b_v, b_h, *velocities)):
        return _fused.cd_update_(call, velocities, lr, momentum, weight_decay)
    # the kernels update contiguous tensors in place; otherwise the fused statistics (so
    # the samples are the kernels' too) and the reference update
    return reference.run_cd_update(
        call, velocities, lr, momentum, weight_decay, statistics=_fused.run_gibbs
    )


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
    """torch.optim.Adam's step, in place, on each (parameter, gradient, first and second
    moment, step count): ``torch.optim.AdamW``'s with ``decoupled``; the gradients first
    clipped to a total norm of ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``, but
    without changing them). If that norm is not finite nothing changes. Returns the norm
    before clipping, a float64 scalar: inf where the sum of squares exceeds the largest
    number of the gradients' dtype (as torch's norm, computed in that dtype, overflows).
    ``steps``: the counts of steps taken (float scalars, as ``torch.optim.Adam`` keeps
    them), each advanced by one.

    On the CPU kernels (float32/64; parameters and moments contiguous) the whole step is
    one call: one read of the gradients, then one pass per parameter. At the sizes of
    small models that is several times faster than ``optimizer.step()``, whose per-tensor
    work in Python is most of the time. On CUDA torch's fused Adam is one kernel already:
    there, and elsewhere, this runs the reference.
    """
    hyper = adam_args.adam_hyperparameters(lr, betas, eps, weight_decay, max_norm)
    frozen = check.any_inference_tensor(params, exp_avgs, exp_avg_sqs, steps)
    if isinstance(params, (list, tuple)) and params and _cpu_fused(params[0]) and not frozen:
        norm = adam_step_own_(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper, decoupled)
        if norm is not None:
            return norm
    adam_args.adam_step_args(params, grads, exp_avgs, exp_avg_sqs, steps)
    return reference.adam_update_(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper, decoupled)


def adam_step_own_(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
    max_norm, decoupled,
) -> Tensor | None:  # fmt: skip
    """:func:`adam_step_` on an optimizer's own operands (numbers validated, CPU
    tensors): the kernels check the tensors themselves. Returns None where they refuse
    the call (it changed nothing): then :func:`adam_step_` explains or runs the
    reference."""
    # (the trainer steps with grad enabled: entering no_grad costs a few µs)
    quiet = torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
    try:
        with quiet:
            norm = torch.ops.aecore.adam_step_(
                params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
                weight_decay, decoupled, max_norm,
            )  # fmt: skip
    except (RuntimeError, TypeError, ValueError):
        return None
    increment_version([*params, *exp_avgs, *exp_avg_sqs, *steps])
    return norm


def _cpu_fused(t) -> bool:
    return isinstance(t, Tensor) and t.device.type == "cpu" and fused(t)
