"""The pieces of the SAE training recipe (Gao et al. 2024; Bricken et al. 2023) that do
not depend on the sparsity rule: the decoder's fixed row norm, the geometric median
that starts the decoder bias, the auxiliary loss that revives dead latents and the
bookkeeping of which latents are dead."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from aecore import ops
from aecore.errors import warn
from aecore.ops import reference

GEOMETRIC_MEDIAN_STEPS = 100


@torch.no_grad()
def set_row_norms(weight: Tensor, norm: float) -> None:
    """Scale each row of ``weight`` to L2 norm ``norm`` (rows of zeros stay zero)."""
    ops.set_row_norms_(weight.data, norm)


@torch.no_grad()
def remove_parallel_gradient(weight: Tensor) -> None:
    """Drop the part of each row's gradient along the row: with rows held at a fixed
    norm, that part would only change the norm, which the next renormalisation undoes,
    and it would distort Adam's statistics."""
    if weight.grad is None:
        return
    ops.remove_parallel_(weight.grad, weight.data)


def input_statistics(x: Tensor, normalize_inputs: bool) -> tuple[float, float]:
    """The input scale c (inputs times c have a mean square of 1 per element; 1 without
    ``normalize_inputs``) and the scaled rows' mean squared distance from their mean
    (the loss's unit: 1 where the rows do not vary)."""
    x = x.flatten(1).double()
    mean_sq = float(x.pow(2).mean())
    if not normalize_inputs and not 0.01 <= mean_sq <= 100:
        warn(
            f"normalize_inputs=False, and these inputs have a mean square of {mean_sq:.3g} "
            f"per element: the SAE recipe's defaults (lr_scale, the sparsity penalties' "
            f"'auto' values, unit decoder rows) are sized for 1; keep normalize_inputs=True "
            f"or scale the inputs"
        )
    c = 1.0 / math.sqrt(mean_sq) if normalize_inputs and mean_sq > 0 else 1.0
    variance = float((x - x.mean(0)).pow(2).sum(1).mean()) * c**2
    return c, (variance if variance > 0 else 1.0)


@torch.no_grad()
def adopt_input_statistics(model, x: Tensor) -> None:
    """Weights from another library's folder (raw units; ``input_scale`` and
    ``input_variance`` 1) put in the form aecore's recipe trains: the input statistics
    measured on ``x``, and the weights rescaled so the function of raw inputs stays, with
    every code times one factor that puts unit decoder rows at norm 1. The loss (a
    fraction of variance) and Adam's steps are then sized as for a model trained here."""
    c, variance = input_statistics(x, model.normalize_inputs)
    # codes times alpha: the encoder times alpha / c, the decoder times c / alpha
    alpha = c * (float(model.decoder_row_norm) if model.unit_decoder else 1.0)
    model.W_enc.mul_(alpha / c)
    model.b_enc.mul_(alpha)
    model.W_dec.mul_(c / alpha)
    model.b_dec.mul_(c)
    if model.unit_decoder:
        model.decoder_row_norm.fill_(1.0)
    model.rule.scale_codes(alpha)
    model.input_scale.fill_(c)
    model.input_variance.fill_(variance)


@torch.no_grad()
def geometric_median(x: Tensor, steps: int = GEOMETRIC_MEDIAN_STEPS, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distances to the rows of ``x``
    (Weiszfeld's iterations from the mean): a centre that outliers pull less than the
    mean, where the decoder bias starts."""
    x = x.double()
    median = x.mean(0)
    for _ in range(steps):
        dist_to = (x - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist_to
        new = (weights[:, None] * x).sum(0) / weights.sum()
        moved = float((new - median).norm())
        median = new
        if moved <= tol * float(median.norm().clamp_min(1.0)):
            break
    return median


def fold_input_scale(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An SAE state with its input scale ``c`` folded into the weights (``c`` = 1 after):
    the same function of raw inputs. Changes ``state`` in place and returns it. A 16-bit
    state is folded in float32, in which 16-bit weights load: folded in 16 bits, the
    rounded scale came back another (bfloat16: 0.9375 as 0.9336) and so did the weights."""
    for key in ("W_enc", "W_dec", "b_dec", "decoder_row_norm", "input_variance", "input_scale"):
        if state[key].dtype in (torch.float16, torch.bfloat16):
            state[key] = state[key].float()
    c = state["input_scale"]
    state["W_enc"] = state["W_enc"] * c
    state["W_dec"] = state["W_dec"] / c
    state["b_dec"] = state["b_dec"] / c
    state["decoder_row_norm"] = state["decoder_row_norm"] / c
    state["input_variance"] = state["input_variance"] / c**2
    state["input_scale"] = torch.ones_like(c)
    return state


def unfold_input_scale(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fold_input_scale`` undone: the scale ``c`` comes back from the decoder rows'
    norm (1 / c once folded), so training resumes on weights of the scale it started
    with (Adam's steps are sized for them). A state never folded is returned as it is,
    and so is one whose statistics were never measured (both 1: weights imported from
    another library, whose decoder rows may sit at any norm; the first fit measures
    them). Changes ``state`` in place and returns it."""
    norm = state["decoder_row_norm"]
    if not bool(state["input_scale"] == 1) or not bool(norm > 0) or bool(norm == 1):
        return state
    if bool(state["input_variance"] == 1):
        return state
    c = 1.0 / norm
    state["W_enc"] = state["W_enc"] / c
    state["W_dec"] = state["W_dec"] * c
    state["b_dec"] = state["b_dec"] * c
    state["decoder_row_norm"] = torch.ones_like(norm)
    state["input_variance"] = state["input_variance"] * c**2
    state["input_scale"] = c.to(state["input_scale"])
    return state


def aux_loss(
    residual: Tensor,
    pre: Tensor,
    dead: Tensor,
    decoder: Tensor,
    aux_k: int,
    total_variance: Tensor,
) -> Tensor:
    """AuxK: the ``aux_k`` largest pre-activations among dead latents (``dead``: a mask
    (n,) over the full (B, n) pre-activations ``pre``) reconstruct the main
    reconstruction's residual (squared error relative to ``total_variance``), scaled down
    while fewer latents are dead than ``aux_k``. Gradients reach only the dead latents'
    encoder and decoder rows, which gives them a reason to fire again (the encoder's also
    while their pre-activations are negative)."""
    if torch.compiler.is_compiling():  # shapes from the mask's size: no count read back
        values, indices = reference.aux_code(pre, dead, min(aux_k, dead.numel()))
        return aux_error(residual, values, indices, decoder, dead.sum(), aux_k, total_variance)
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    # the dead columns alone: fewer to rank than all n (their count is read already)
    index = dead.nonzero().flatten()
    values, local = reference.aux_code(pre[:, index], dead[index], min(aux_k, n_dead))
    return aux_error(residual, values, index[local], decoder, n_dead, aux_k, total_variance)


def aux_error(residual, values, indices, decoder, n_dead, aux_k: int, total_variance):
    """AuxK's term from its code (``values`` at latents ``indices``, (B, min(aux_k,
    n_dead))): ``aux_loss``'s, and the sparse path's, whose encoder picks the code from
    the same tiles as the main one (``aecore.ops.topk_encode(..., dead=...)``). ``n_dead``
    is a count or, under torch.compile, a tensor holding it."""
    # a gather-sum: the (B, k, d) rows of decoder[indices] would be gigabytes at k = d / 2
    zero = decoder.new_zeros(decoder.shape[1])
    recon = ops.sparse_decode(values, indices, decoder, zero, check_indices=False)
    err = (recon - residual.detach()).pow(2).sum()
    if torch.is_tensor(n_dead):
        scale = (n_dead / aux_k).clamp(max=1.0).to(err.dtype)
    else:
        scale = min(n_dead / aux_k, 1.0)
    return scale * err / total_variance


class FiringTracker:
    """Which latents fired on the training batches since the last optimizer step, to
    update a model's count of rows seen since each latent last fired (``commit``),
    over every process under torchrun. The count is a model buffer, so checkpoints
    and resumes carry it."""

    def __init__(self) -> None:
        self._fired: Tensor | None = None
        self._rows = 0

    @torch.no_grad()
    def record(self, code: Tensor) -> None:
        fired = (code != 0).any(0)
        self._fired = fired if self._fired is None else self._fired | fired
        self._rows += len(code)

    @torch.no_grad()
    def record_sparse(self, values: Tensor, indices: Tensor, n: int) -> None:
        """``record`` for a sparse code: ``values`` at latents ``indices``, both (B, m)."""
        # pairs with value 0 mark a spare slot n: a boolean-mask index would read its
        # count back from the device (a wait each step on CUDA)
        slots = torch.where(values != 0, indices, n).flatten()
        fired = torch.zeros(n + 1, dtype=torch.bool, device=values.device)
        fired = fired.index_fill_(0, slots, True)[:n]
        self._fired = fired if self._fired is None else self._fired | fired
        self._rows += len(values)

    @torch.no_grad()
    def commit(self, since_fired: Tensor) -> None:
        """Add the recorded rows (all processes') to every latent's count and zero
        the count of those that fired."""
        if self._fired is None:
            return
        fired = self._fired.to(torch.int32)
        rows = torch.tensor([self._rows], device=fired.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            dist.all_reduce(rows)
        since_fired.add_(rows.to(since_fired))
        since_fired.masked_fill_(fired.bool(), 0)
        self._fired, self._rows = None, 0
