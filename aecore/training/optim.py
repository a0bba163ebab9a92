"""Optimizers and the update of one step, with the checks that keep a bad step
from reaching the weights (non-finite loss or gradient, an L-BFGS line search that
diverged)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from aecore.config import TrainConfig
from aecore.errors import ConfigError, NonFiniteError, TrainingError
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
    optimizer.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
    before = getattr(model, "before_optimizer_step", None)
    if before is not None:
        before()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    # both flags in one number: one read
    flags = int((~torch.isfinite(loss.detach())).to(norm.device) * 2 + ~torch.isfinite(norm))
    loss_bad, grad_bad = flags >= 2, flags % 2 == 1
    if loss_bad or grad_bad:
        optimizer.zero_grad(set_to_none=True)
        what = f"non-finite loss ({loss.item()})" if loss_bad else "non-finite gradient"
        raise TrainingError(
            f"{what} at {where}; the model keeps the weights from before this step. "
            f"{_remedy(where, batch, named)}"
        )
    if grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(
            [p for p in model.parameters() if p.grad is not None], grad_clip, norm
        )
    optimizer.step()
    after = getattr(model, "after_optimizer_step", None)
    if after is not None:
        after()


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
