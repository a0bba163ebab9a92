"""How much of a causal LM's next-token loss survives when a hooked module's output is
replaced by a reconstruction (an SAE's, say): the splice metric.

``ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``: 1 when the
reconstruction costs the model nothing, 0 when it is as bad as zeroing the output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aecore.activations.models import find_modules, first_tensor, vocabulary, vocabulary_size
from aecore.base import Autoencoder, eval_mode
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.keywords import checked_keywords
from aecore.params import integer


@checked_keywords
def ce_loss_recovered(
    model: nn.Module,
    hook: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    tokens: Any,
    *,
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token cross-entropy (nats per predicted token) of causal LM ``model`` over
    ``tokens`` (int, (N, seq_len)): clean, with module ``hook``'s output replaced by
    ``reconstruct(output)`` (float32 (..., d) in, the same shape out; an aecore model
    of d inputs, such as an SAE, may be given itself: each position is a row), and with
    that output zeroed; plus ``ce_loss_recovered`` (NaN where zeroing changes nothing).

    The logits are ``model(ids).logits`` (or the output itself / its element 0). Runs
    in eval mode without gradients on the model's device; a tuple output keeps its
    other elements.
    """
    module = find_modules(model, [hook])[hook]
    batch_size = integer("batch_size", batch_size, low=1)
    ids = torch.as_tensor(np.asarray(tokens))
    if (
        ids.ndim != 2 or ids.shape[1] < 2 or not len(ids)
        or ids.dtype.is_floating_point or ids.dtype == torch.bool
    ):  # fmt: skip
        raise DataError(
            f"tokens: expected integer token ids of shape (N >= 1, seq_len >= 2); got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )
    vocab = vocabulary_size(model)
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise DataError(
            f"tokens: ids in [{int(ids.min())}, {int(ids.max())}]; the model takes "
            f"{vocabulary(vocab)}"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    replace: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None]

    def splice(mod, args, output):
        if replace[0] is None:
            return None
        acts = first_tensor(output, hook)
        fn = replace[0]
        if isinstance(fn, Autoencoder) and len(fn.input_shape) == 1:
            if acts.shape[-1] != fn.input_size:
                raise ShapeError(
                    f"{hook!r} outputs {acts.shape[-1]} features per position, but the "
                    f"{type(fn).__name__} spliced in takes {fn.input_size}: was it trained on "
                    f"another hook or model?"
                )
            new = _model_reconstruction(fn, acts)
        else:
            new = fn(acts.float())
        if not isinstance(new, torch.Tensor):
            raise ConfigError(
                f"reconstruct must return a torch tensor of the activations' shape "
                f"{tuple(acts.shape)}; got {type(new).__module__}.{type(new).__name__}"
            )
        if new.shape != acts.shape:
            raise ConfigError(
                f"reconstruct must return a tensor of the activations' shape "
                f"{tuple(acts.shape)}; got {tuple(new.shape)}"
            )
        return _with_first(output, new.to(acts.dtype))

    variants = {
        "ce_clean": None,
        "ce_spliced": reconstruct,
        "ce_zero": torch.zeros_like,
    }
    totals = dict.fromkeys(variants, 0.0)
    count = 0
    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(splice)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size].to(device, torch.long)
                targets = batch[:, 1:].reshape(-1)
                for name, fn in variants.items():
                    replace[0] = fn
                    logits = _logits(model(batch))[:, :-1]
                    totals[name] += float(
                        F.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum"
                        )
                    )
                count += targets.numel()
    finally:
        handle.remove()
        model.train(was_training)
    result = {name: total / count for name, total in totals.items()}
    gap = result["ce_zero"] - result["ce_clean"]
    result["ce_loss_recovered"] = (
        (result["ce_zero"] - result["ce_spliced"]) / gap if gap != 0 else float("nan")
    )
    return result


def _with_first(output: Any, new: torch.Tensor) -> Any:
    """``output`` (a tensor, a tuple or list, a transformers ``ModelOutput``) with its
    activation tensor (``first_tensor``'s) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]])
    output[next(iter(output.keys()))] = new  # a ModelOutput: its first field
    return output


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ConfigError(
            f"expected a causal LM whose output has logits (batch, seq_len, vocab); got "
            f"{type(output).__name__}"
        )
    return logits


def _model_reconstruction(model: Autoencoder, acts: torch.Tensor) -> torch.Tensor:
    """An aecore model's reconstruction of activations (..., d), each position a row, in
    the activations' units: its normalisation applied and inverted, on its device, in
    eval mode (as it would serve: a BatchTopK SAE then uses its threshold)."""
    rows = acts.float().reshape(-1, acts.shape[-1])
    norm = getattr(model, "normalization", None)
    scaled = norm is not None and norm.kind != "none"
    if scaled:
        rows = torch.from_numpy(norm.apply(rows.cpu().numpy()))
    first = next(model.parameters(), None)
    with eval_mode(model):
        out = model(rows.to(first.device if first is not None else rows.device))
    if scaled:
        out = torch.from_numpy(norm.invert(out.cpu().numpy()))
    return out.to(acts.device, torch.float32).reshape(acts.shape)
