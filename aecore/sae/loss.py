"""An SAE's training loss: the reconstruction's fraction of variance unexplained, the
rule's penalties, Matryoshka's nested prefixes and AuxK, with the firing statistics.

Two paths compute it. Where the rule gives its training code from the sparse kernels
(``rule.sparse_training_code``: TopK, and BatchTopK from each row's top candidates),
``aecore.ops.topk_encode`` and ``sparse_decode`` never form the (B, n) pre-activations
or code, AuxK's included (picked among the dead latents from the same tiles).
Otherwise the dense path computes every latent's pre-activation."""

from __future__ import annotations

import torch
from torch import Tensor

from aecore import ops
from aecore.sae.recipe import aux_error, aux_loss


def sae_loss(model, x: Tensor) -> dict[str, Tensor]:
    """``model.loss(x)`` of a ``SparseDictionary``."""
    model.check_input(x)
    xs = model._scaled(x.to(model.W_enc.dtype))
    training = model.training and torch.is_grad_enabled()
    if training and not getattr(model.rule, "prefixes", None):
        dead, n_dead = _dead_to_revive(model)
        # AuxK picks at most the dead latents (aux_k's default, d / 2, may pass the
        # dictionary's size)
        aux_k = model.aux_k if torch.is_tensor(n_dead) else min(model.aux_k, n_dead)
        code = model.rule.sparse_training_code(
            xs, model.W_enc, model.b_enc, model.b_dec, aux_k=aux_k, dead=dead
        )
        if code is not None:
            return _sparse_loss(model, xs, *code, n_dead=n_dead)
    return _dense_loss(model, xs, training)


def _aux_term(model, training: bool) -> bool:
    return model.rule.uses_aux and model.aux_coefficient > 0 and training


def _dead_to_revive(model) -> tuple[Tensor | None, int]:
    """The mask of the dead latents AuxK revives in a training step, and their count;
    (None, 0) where there is no AuxK term or nothing to revive."""
    if not _aux_term(model, True):
        return None, 0
    dead = model.dead_latents()
    if torch.compiler.is_compiling():  # no count read back: a code padded to aux_k,
        return dead, dead.sum()  # scaled by the count (recipe.aux_error)
    n_dead = int(dead.sum())
    return (dead if n_dead else None), n_dead


def _finish(model, loss: Tensor, terms: dict[str, Tensor], l0: Tensor) -> dict[str, Tensor]:
    terms["l0"] = l0.detach()
    if model.training:  # the firing tracker follows the training rows, not these
        terms["dead_fraction"] = model.dead_latents().float().mean()
    return {"loss": loss, **terms}


def _sparse_loss(model, xs: Tensor, values, indices, *aux_code, n_dead=0) -> dict[str, Tensor]:
    total_variance = model.input_variance * len(xs)
    residual = xs - ops.sparse_decode(
        values, indices, model.W_dec, model.b_dec, check_indices=False
    )
    fvu = residual.pow(2).sum() / total_variance
    terms: dict[str, Tensor] = {"fvu": fvu}
    loss = fvu
    model.firing.record_sparse(values, indices, model.latent_dim)
    if _aux_term(model, True):
        aux = xs.new_zeros(())
        if aux_code:  # (aux_values, aux_indices) among the dead latents
            aux = aux_error(residual, *aux_code, model.W_dec, n_dead, model.aux_k, total_variance)
        terms["auxk"] = aux.detach()
        loss = loss + model.aux_coefficient * aux
    return _finish(model, loss, terms, (values > 0).sum(1).float().mean())


def _dense_loss(model, xs: Tensor, training: bool) -> dict[str, Tensor]:
    pre = model._pre(xs)
    code = model.rule.code(pre)
    total_variance = model.input_variance * len(xs)
    residual = xs - (code @ model.W_dec + model.b_dec)
    fvu = residual.pow(2).sum() / total_variance
    terms: dict[str, Tensor] = {"fvu": fvu}
    loss = fvu
    prefixes = getattr(model.rule, "prefixes", None)
    if prefixes and len(prefixes) > 1:  # each nested prefix reconstructs on its own too
        partial = [
            (xs - code[:, :m] @ model.W_dec[:m] - model.b_dec).pow(2).sum() / total_variance
            for m in prefixes[:-1]
        ]
        loss = (sum(partial) + fvu) / len(prefixes)
        terms["prefix_fvu"] = partial[0].detach()
    if model.rule.penalised:
        norms = model.W_dec.norm(dim=1)
        for name, value in model.rule.penalty(code, pre, norms).items():
            terms[name] = value
            loss = loss + value
    if training:
        model.firing.record(code)
    if _aux_term(model, training):
        aux = aux_loss(
            residual, pre, model.dead_latents(), model.W_dec, model.aux_k, total_variance
        )
        terms["auxk"] = aux.detach()
        loss = loss + model.aux_coefficient * aux
    return _finish(model, loss, terms, (code != 0).sum(1).float().mean())
