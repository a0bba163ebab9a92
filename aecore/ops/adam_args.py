"""adam_step_'s argument checks, shared by the fused op and the reference: a bad input
becomes a ShapeError or ConfigError naming it, before anything changes."""

from __future__ import annotations

import torch

from aecore import params
from aecore.errors import ConfigError, ShapeError
from aecore.ops.validation import _shape, tensor, writable

OP = "adam_step_"
LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")


def adam_hyperparameters(lr, betas, eps, weight_decay, max_norm) -> tuple:
    """(lr, beta1, beta2, eps, weight_decay, max_norm) as floats (max_norm may be None),
    in torch.optim.Adam's ranges."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"{OP}: betas must be a pair (beta1, beta2), got {betas!r}")
    if max_norm is not None:
        try:
            max_norm = params.number(f"{OP}: max_norm", max_norm, low=0.0, low_open=True)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("; got", ", or None; got")) from None
    beta = {"low": 0.0, "high": 1.0, "high_open": True}
    return (
        params.number(f"{OP}: lr", lr, low=0.0),
        params.number(f"{OP}: betas[0]", betas[0], **beta),
        params.number(f"{OP}: betas[1]", betas[1], **beta),
        params.number(f"{OP}: eps", eps, low=0.0),
        params.number(f"{OP}: weight_decay", weight_decay, low=0.0),
        max_norm,
    )


def adam_step_args(params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
    """The tensors: one gradient, two moments (the parameter's shape, dtype and device)
    and a step count (a float scalar) per parameter."""
    lists = dict(zip(LISTS, (params, grads, exp_avgs, exp_avg_sqs, steps)))
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise ConfigError(f"{OP}: {name} must be a list of tensors, got {type(seq).__name__}")
    n = len(params)
    if n == 0:
        raise ConfigError(f"{OP}: params is empty")
    if any(len(seq) != n for seq in lists.values()):
        counts = ", ".join(f"{len(seq)} {name}" for name, seq in lists.items())
        raise ConfigError(f"{OP}: one gradient, two moments and a step per parameter; got {counts}")
    first = params[0]
    for i in range(n):
        for name in LISTS[:4]:
            t = lists[name][i]
            like = None if t is first else first
            tensor(OP, f"{name}[{i}]", t, t.dim() if isinstance(t, torch.Tensor) else 0,
                   like=like, like_name="params[0]")  # fmt: skip
            if t.layout != torch.strided:
                raise ConfigError(f"{OP}: {name}[{i}] is {t.layout}; the op takes dense tensors "
                                  f"(torch.optim.SparseAdam takes sparse gradients)")  # fmt: skip
            if t.shape != params[i].shape:
                raise ShapeError(
                    f"{OP}: {name}[{i}] has shape {_shape(t)}, params[{i}] {_shape(params[i])}"
                )
            if name != "grads":
                writable(OP, f"{name}[{i}]", t)
        step = steps[i]
        tensor(OP, f"steps[{i}]", step, step.dim() if isinstance(step, torch.Tensor) else 0)
        if step.numel() != 1 or (step.device.type != "cpu" and step.device != first.device):
            raise ShapeError(
                f"{OP}: steps[{i}] must be one number (a scalar tensor on the CPU or beside "
                f"its parameter), got shape {_shape(step)} on {step.device}"
            )
        writable(OP, f"steps[{i}]", step)
    _distinct_writes(lists)


def _distinct_writes(lists: dict) -> None:
    """The tensors the step writes share no memory (each update would read another's)."""
    spans = []
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, t in enumerate(lists[name]):
            start = t.data_ptr()
            spans.append((start, start + t.numel() * t.element_size(), f"{name}[{i}]"))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ConfigError(
                f"{OP}: {second} shares memory with {first}; the step writes both in place: "
                f"pass tensors of their own"
            )
