"""Optimizers and the update of one step, with the checks that keep a bad step
from reaching the weights (non-finite loss or gradient, an L-BFGS line search that
diverged)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from aecore.config import TrainConfig
from aecore.errors import ConfigError, NonFiniteError, TrainingError
from aecore.ops.updates import adam_step_own_
from aecore.training import state as run_state
from aecore.training.batches import first_non_finite
from aecore.training.evaluation import divergence_advice, loss_terms
from aecore.training.state import StepPlace

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    # full-batch quasi-Newton, as in Ng's sparse autoencoder exercise: use a batch_size
    # of the whole data; each step runs up to 20 iterations with a line search
    "lbfgs": torch.optim.LBFGS,
}


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters")
    cls = OPTIMIZERS[config.optimizer]
    # a model may scale the learning rate (an SAE to its number of latents, decaying at
    # the end of the run); the run loop updates it every step
    factor = getattr(model, "lr_factor", None)
    lr = config.for_model(model).lr * (factor(0.0) if factor is not None else 1.0)
    if config.optimizer == "lbfgs":
        if hasattr(model, "before_optimizer_step") or hasattr(model, "after_optimizer_step"):
            raise ConfigError(
                f"{type(model).__name__} constrains its weights around each optimizer "
                f"step, which L-BFGS's line search cannot honour; use adam"
            )
        if getattr(model, "warmup_steps", 0):  # the VAE's KL warm-up
            raise ConfigError(
                f"{type(model).__name__}'s warmup_steps counts loss calls, and L-BFGS calls "
                f"the loss many times a step (its weight would change within one line "
                f"search): use adam, or warmup_steps=0"
            )
        return cls(params, lr=lr, max_iter=20, history_size=20, line_search_fn="strong_wolfe")
    kwargs = {"lr": lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        kwargs["momentum"] = 0.9
    elif _fusable(params):
        # torch's fused Adam: one kernel over all parameters instead of a dozen passes
        # per tensor (about 5x faster on the CPU for an SAE's 16M weights), same update
        kwargs["fused"] = True
    return cls(params, **kwargs)


def _fusable(params: list[torch.Tensor]) -> bool:
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def finite_loss_terms(
    loss_fn: Callable,
    x: torch.Tensor,
    dist,
    device,
    where: StepPlace,
    defer: bool = False,
    named: Callable[[str], str | None] = str,
) -> dict:
    """``loss_fn(x)``'s terms, or a TrainingError (before any weight changes) when the
    loss is not finite, or a kernel met values it cannot rank, in any process: every
    process learns of it, so none waits on the others. ``named``: what the caller calls a
    training setting (None: one it does not offer), for the advice.

    ``defer`` (one process only): the loss is left for :func:`gradient_step` to check
    with the gradient, one read back from the device a step instead of two."""
    try:
        terms, refused = loss_fn(x), None
    except NonFiniteError as exc:  # a top-k of NaN pre-activations
        terms, refused = {"loss": torch.tensor(float("nan"))}, exc
    if refused is None:
        terms = loss_terms(getattr(loss_fn, "__self__", loss_fn), terms)
        if defer and not dist.active:
            return terms
    loss = terms["loss"]
    if dist.any([not torch.isfinite(loss)], device)[0]:
        what = f"{refused}" if refused is not None else f"non-finite loss ({loss.item()})"
        raise TrainingError(
            f"{what} at {where}; the model keeps the weights from before this step. "
            f"{_remedy(where, x, named)}"
        )
    return terms


def _remedy(where: StepPlace, batch: torch.Tensor | None, named) -> str:
    floats = batch is not None and batch.is_floating_point()
    bad = first_non_finite(batch, "the batch") if floats else None
    if bad is not None:  # the rows, not the model: data a loader streams is unchecked
        return f"The data holds NaN or infinite values ({bad}); clean or impute them first."
    if where.step == 1:  # no step taken yet: no step size to blame
        return (
            "At the first step this is the data's scale, not the step size: normalise the "
            "data (normalize='auto' or 'standardize') or rescale it."
        )
    return divergence_advice(named).capitalize() + "."


def gradient_step(
    model,
    optimizer,
    loss: torch.Tensor,
    scale: float,
    grad_clip: float | None,
    where: StepPlace,
    batch: torch.Tensor | None = None,
    named: Callable[[str], str | None] = str,
) -> None:
    """Backpropagate ``loss * scale`` and step, unless the loss or the gradient is not
    finite: both are read back from the device at once, the step's one wait for it."""
    # the optimizer's own list: walking the model's modules costs more than a small step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _clear_grads(params)
    (loss * scale if scale != 1.0 else loss).backward()
    before = getattr(model, "before_optimizer_step", None)
    if before is not None:
        before()

    def refuse(what: str):
        _clear_grads(params)
        return TrainingError(
            f"{what} at {where}; the model keeps the weights from before this step. "
            f"{_remedy(where, batch, named)}"
        )

    # a finite loss on the CPU is read at no cost; then the fused step checks the gradient
    norm = fused_adam_step(optimizer, grad_clip) if _finite_on_cpu(loss) else None
    if norm is not None:
        if not math.isfinite(norm):
            raise refuse("non-finite gradient")
    else:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        # both flags in one number: one read
        flags = int((~torch.isfinite(loss.detach())).to(total.device) * 2 + ~torch.isfinite(total))
        if flags >= 2:
            raise refuse(f"non-finite loss ({loss.item()})")
        if flags:
            raise refuse("non-finite gradient")
        if grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(
                [p for p in params if p.grad is not None], grad_clip, total
            )
        optimizer.step()
    after = getattr(model, "after_optimizer_step", None)
    if after is not None:
        after()


def _adam_state(optimizer, live: list[torch.Tensor]) -> tuple[list, list, list]:
    """The moments and step counts of ``live`` in ``optimizer.state``, started as torch's
    Adam starts them; the lists are kept on the optimizer while the parameters and their
    state dicts are the same (gathering them each step cost a tenth of a small model's
    step). A state dict's entries replaced in place would go unseen: aecore never does."""
    state = optimizer.state
    kept = optimizer.__dict__.get("_aecore_adam_lists")
    if (
        kept is not None
        and kept[0] is state
        and len(kept[1]) == len(live)
        and all(a is b and state[a] is d for a, b, d in zip(kept[1], live, kept[3]))
    ):
        return kept[2]
    for p in live:
        if not state[p]:
            state[p]["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    lists = tuple([state[p][key] for p in live] for key in ("exp_avg", "exp_avg_sq", "step"))
    optimizer.__dict__["_aecore_adam_lists"] = (state, live, lists, [state[p] for p in live])
    return lists


def _finite_on_cpu(loss: torch.Tensor) -> bool:
    return run_state.read_is_free(loss) and math.isfinite(loss.item())


def fused_adam_step(optimizer, grad_clip: float | None) -> float | None:
    """``optimizer.step()``, after clipping the gradients to ``grad_clip``, as one call
    into aecore's CPU kernels (:func:`aecore.ops.adam_step_`), where that is the same
    update: torch's Adam or AdamW with its default flags, on CPU tensors of the kernels'
    dtypes, and no step hooks. The optimizer's state stays torch's (its checkpoints load
    either way); the gradients are left as the backward made them (the clipping scales
    them inside the update). Returns the gradients' norm (the step applied only if it is
    finite), or None where ``optimizer.step()`` must run."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    if len(optimizer.param_groups) != 1 or optimizer._optimizer_step_pre_hooks:
        return None
    if (
        optimizer._optimizer_step_post_hooks
        or _global_optimizer_pre_hooks
        or _global_optimizer_post_hooks
    ):
        return None
    group = optimizer.param_groups[0]
    plain = not any(
        group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable")
    )
    lr = group["lr"]
    live = [p for p in group["params"] if p.grad is not None]
    if not (plain and live and isinstance(lr, float) and live[0].device.type == "cpu"):
        return None
    exp_avgs, exp_avg_sqs, steps = _adam_state(optimizer, live)
    decoupled = group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
    beta1, beta2 = group["betas"]
    norm = adam_step_own_(
        live, [p.grad for p in live], exp_avgs, exp_avg_sqs, steps, lr, float(beta1),
        float(beta2), float(group["eps"]), float(group["weight_decay"]), grad_clip,
        bool(decoupled),
    )  # fmt: skip
    return None if norm is None else float(norm)


def _clear_grads(params: list[torch.Tensor]) -> None:
    # as ``optimizer.zero_grad(set_to_none=True)``, without its profiler scope per call
    for p in params:
        p.grad = None


def lbfgs_step(
    model, optimizer, loss_fn: Callable[[], torch.Tensor], scale: float, where: StepPlace
) -> None:
    """One L-BFGS step; it re-evaluates the loss during its line search, so the weights
    are checked afterwards and put back if they went non-finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn() * scale
        loss.backward()
        return loss

    optimizer.step(closure)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        raise TrainingError(
            f"non-finite weights after the L-BFGS step at {where}; the model keeps the "
            f"weights from before this step. Lower the learning rate."
        )
