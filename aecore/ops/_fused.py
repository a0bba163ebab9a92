"""The compiled kernels from Python: fake (meta) kernels and autograd for the
``torch.ops.aecore`` schemas, and the calls the public ops make when the kernels for a
tensor's device are loaded. Arguments arrive validated (aecore.ops.validation)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from aecore.errors import NonFiniteError
from aecore.ops._extension import SCHEMAS_LOADED
from aecore.ops.reference import aux_gate
from aecore.ops.types import CDStats, GibbsCall, GibbsChain

if SCHEMAS_LOADED:

    @torch.library.register_fake("aecore::gibbs_chain")
    def _gibbs_chain_fake(v, W, b_v, b_h, k, gaussian_v, gaussian_h, sample_v, rng, n0, nh, nv):
        B, V, H = v.shape[0], v.shape[1], W.shape[1]
        return tuple(v.new_empty(s) for s in ((B, H), (B, H), (B, V), (B, V), (B, H), (B, H)))

    @torch.library.register_fake("aecore::cd_step")
    def _cd_step_fake(v, W, b_v, b_h, k, chain, gaussian_v, gaussian_h, sample_v, rng, n0, nh, nv):
        V, H = v.shape[1], W.shape[1]
        Bc = chain.shape[0] if chain is not None else v.shape[0]
        return (
            v.new_empty((V, H)),
            v.new_empty((V,)),
            v.new_empty((H,)),
            v.new_empty((Bc, H)),
            v.new_empty(()),
        )

    @torch.library.register_fake("aecore::kl_sparsity")
    def _kl_fake(h, rho, beta):
        return h.new_empty(()), h.new_empty((h.shape[1],))

    @torch.library.register_fake("aecore::kl_sparsity_backward")
    def _kl_backward_fake(grad_loss, grad_mean, mean, rows, rho, beta):
        return mean.new_empty((mean.shape[0],))

    @torch.library.register_fake("aecore::topk_sparsify")
    def _topk_fake(z, k):
        return z.new_empty(z.shape), z.new_empty((z.shape[0], k), dtype=torch.int64)

    @torch.library.register_fake("aecore::topk_sparsify_backward")
    def _topk_backward_fake(grad_out, indices):
        return grad_out.new_empty(grad_out.shape)

    @torch.library.register_fake("aecore::topk_encode")
    def _topk_encode_fake(x, W_enc, b_enc, b_dec, k, aux_k=0, dead=None, check_finite=True):
        B = x.shape[0]
        return (
            x.new_empty((B, k)),
            x.new_empty((B, k), dtype=torch.int64),
            x.new_empty((B, aux_k)),
            x.new_empty((B, aux_k), dtype=torch.int64),
        )

    @torch.library.register_fake("aecore::topk_encode_backward")
    def _topk_encode_backward_fake(grad_values, values, indices, x, W_enc, b_dec):
        return (
            x.new_empty(x.shape),
            W_enc.new_empty(W_enc.shape),
            W_enc.new_empty((W_enc.shape[0],)),
            x.new_empty((x.shape[1],)),
        )

    @torch.library.register_fake("aecore::sparse_decode")
    def _sparse_decode_fake(values, indices, W_dec, b_dec):
        return values.new_empty((values.shape[0], W_dec.shape[1]))

    @torch.library.register_fake("aecore::sparse_decode_backward")
    def _sparse_decode_backward_fake(grad_out, values, indices, W_dec):
        return (
            values.new_empty(values.shape),
            W_dec.new_empty(W_dec.shape),
            W_dec.new_empty((W_dec.shape[1],)),
        )

    @torch.library.register_fake("aecore::remove_parallel_")
    def _remove_parallel_fake(grad, weight):
        return None

    @torch.library.register_fake("aecore::set_row_norms_")
    def _set_row_norms_fake(weight, norm):
        return None

    @torch.library.register_fake("aecore::momentum_step_")
    def _momentum_step_fake(params, velocities, steps, lr, momentum, weight_decay):
        return params[0].new_empty((), dtype=torch.bool)

    @torch.library.register_fake("aecore::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, *numbers):
        return params[0].new_empty((), dtype=torch.float64)

    @torch.library.register_fake("aecore::cd_update_")
    def _cd_update_fake(v, W, b_v, b_h, vel_W, vel_b_v, vel_b_h, k, chain, *rest):
        return v.new_empty(()), v.new_empty((), dtype=torch.bool)

    def _topk_encode_setup(ctx, inputs, output):
        x, W_enc, _b_enc, b_dec, _k, _aux_k, dead, _check_finite = inputs
        values, indices, _aux_values, aux_indices = output
        ctx.save_for_backward(values, indices, aux_indices, dead, x, W_enc, b_dec)

    def _topk_encode_backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices):
        first_order_only("topk_encode")
        values, indices, aux_indices, dead, x, W_enc, b_dec = ctx.saved_tensors
        grads = _encoder_backward(
            grad_values, values, indices, grad_aux, aux_indices, dead, x, W_enc, b_dec
        )
        return (*grads, None, None, None, None)

    torch.library.register_autograd(
        "aecore::topk_encode", _topk_encode_backward, setup_context=_topk_encode_setup
    )

    def _sparse_decode_setup(ctx, inputs, output):
        values, indices, W_dec, _b_dec = inputs
        ctx.save_for_backward(values, indices, W_dec)

    def _sparse_decode_backward(ctx, grad_out):
        first_order_only("sparse_decode")
        values, indices, W_dec = ctx.saved_tensors
        g_values, g_W, g_b = torch.ops.aecore.sparse_decode_backward(
            grad_out, values, indices, W_dec
        )
        return g_values, None, g_W, g_b

    torch.library.register_autograd(
        "aecore::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
    )


# The public ops differentiate through these lean autograd.Functions (the same forward
# and backward ops as the registrations above, which serve direct torch.ops.aecore
# users): torch.library's generic autograd wrapper runs in Python and at typical sizes
# costs as much as the kernels themselves. Dynamo traces both without graph breaks.
#
# In eager mode the forward ops are also called below the Autograd dispatch key: their
# Autograd kernel is torch.library's Python wrapper (from register_autograd above), which
# for a call that records nothing only redispatches. Under torch.compile (Dynamo cannot
# trace that guard) they are called plainly.
def _below_autograd(op, *args):
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def first_order_only(op: str) -> None:
    """The backward ops have no derivatives of their own: under ``create_graph`` their
    gradients would differentiate as constants, so second derivatives would be silently
    wrong."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"aecore: {op}'s fused backward has no derivative of its own: second "
            f"derivatives (create_graph=True) need aecore.ops.reference.{op}"
        )


def _encoder_backward(grad_values, gate, indices, grad_aux, aux_indices, dead, x, W_enc, b_dec):
    """topk_encode's gradients: the kept pairs whose ``gate`` is positive (the ReLU'd
    values; ones for straight-through) and every AuxK pair but the padding past the
    number of dead latents (straight-through), in one backward call over both codes."""
    if grad_values is None:
        grad_values = torch.zeros_like(gate)
    if aux_indices.shape[1]:
        if grad_aux is None:
            grad_aux = gate.new_zeros(aux_indices.shape)
        grad_values = torch.cat([grad_values, grad_aux], 1)
        gate = torch.cat([gate, aux_gate(dead, aux_indices.shape, gate.dtype)], 1)
        indices = torch.cat([indices, aux_indices], 1)
    return torch.ops.aecore.topk_encode_backward(grad_values, gate, indices, x, W_enc, b_dec)


class _TopkEncode(torch.autograd.Function):
    """The encoder and, with ``dead``, AuxK's selection from the same tiles (empty
    otherwise); one backward for both codes. ``straight_through``: every kept pair's
    gradient reaches its pre-activation, positive or not (the backward op passes the
    pairs whose "value" is positive, so it is given ones)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, straight_through, aux_k, dead, check_finite):
        out = _below_autograd(
            torch.ops.aecore.topk_encode.default,
            *(x, W_enc, b_enc, b_dec, k, aux_k, dead, check_finite),
        )
        values, indices, _aux_values, aux_indices = out
        ctx.straight_through = straight_through
        # straight-through's gate is ones: the values are not read, so a caller may
        # change them in place
        gate = None if straight_through else values
        ctx.save_for_backward(gate, indices, aux_indices, dead, x, W_enc, b_dec)
        ctx.mark_non_differentiable(indices, aux_indices)
        return out

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices):
        first_order_only("topk_encode")
        gate, indices, aux_indices, dead, x, W_enc, b_dec = ctx.saved_tensors
        if ctx.straight_through:
            gate = torch.ones_like(indices, dtype=x.dtype)
        grads = _encoder_backward(
            grad_values, gate, indices, grad_aux, aux_indices, dead, x, W_enc, b_dec
        )
        return (*grads, None, None, None, None, None)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        out = _below_autograd(torch.ops.aecore.sparse_decode.default, values, indices, W_dec, b_dec)
        ctx.save_for_backward(values, indices, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        first_order_only("sparse_decode")
        values, indices, W_dec = ctx.saved_tensors
        g_values, g_W, g_b = torch.ops.aecore.sparse_decode_backward(
            grad_out, values, indices, W_dec
        )
        return g_values, None, g_W, g_b


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def topk_encode(
    x,
    W_enc,
    b_enc,
    b_dec,
    k: int,
    straight_through: bool = False,
    aux_k: int = 0,
    dead=None,
    check_finite: bool = True,
):
    """(values, indices), or with ``dead`` also AuxK's (aux_values, aux_indices)."""
    args = (x, W_enc, b_enc, b_dec, k)
    if _needs_grad(x, W_enc, b_enc, b_dec):
        out = _TopkEncode.apply(*args, straight_through, aux_k, dead, check_finite)
    else:
        op = torch.ops.aecore.topk_encode.default
        out = _below_autograd(op, *args, aux_k, dead, check_finite)
    return out if dead is not None else out[:2]


def encode_or_refuse(*args) -> tuple[Tensor, ...]:
    """``topk_encode``, its kernels' refusal of NaN typed (``NonFiniteError``) for the trainer."""
    try:
        return topk_encode(*args)
    except RuntimeError as exc:
        if "NaN or infinite pre-activation" in str(exc):
            raise NonFiniteError(str(exc).splitlines()[0].removeprefix("aecore: ")) from None
        raise


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    if _needs_grad(values, W_dec, b_dec):
        return _SparseDecode.apply(values, indices, W_dec, b_dec)
    return _below_autograd(torch.ops.aecore.sparse_decode.default, values, indices, W_dec, b_dec)


# the sparsity penalties' autograd is C++ (csrc/ops.cpp): a plain call differentiates
def kl_sparsity(h: Tensor, rho: float, beta: float) -> Tensor:
    return torch.ops.aecore.kl_sparsity.default(h, rho, beta)[0]


def topk_sparsify(z: Tensor, k: int) -> Tensor:
    return torch.ops.aecore.topk_sparsify.default(z, k)[0]


def _operands(c: GibbsCall) -> tuple:
    """The tensors of a Gibbs call as the kernels take them: detached where they require
    grad (the Gibbs ops are not differentiable; a detach is a real cost at small sizes),
    then {seed, offset} of the Philox streams (drawn from the generator on v's device)
    and the noise tensors each pass uses."""
    v, W, b_v, b_h = (t.detach() if t.requires_grad else t for t in (c.v, c.W, c.b_v, c.b_h))
    chain = c.chain.detach() if c.chain is not None and c.chain.requires_grad else c.chain
    if c.noise is None:
        rng = torch.randint(
            0, 2**62, (2,), dtype=torch.int64, device=v.device, generator=c.generator
        )
        nh0 = nh = nv = None
    else:
        rng = torch.zeros(2, dtype=torch.int64, device=v.device)
        nh0 = None if c.stats and chain is not None else c.noise.h0
        nh = c.noise.h
        nv = c.noise.v if c.sample_visible else None
    return v, W, b_v, b_h, chain, rng, nh0, nh, nv


def run_gibbs(c: GibbsCall) -> GibbsChain | CDStats:
    """gibbs_chain / cd_step on the compiled kernels."""
    v, W, b_v, b_h, chain, rng, nh0, nh, nv = _operands(c)
    units = (c.gaussian_visible, c.gaussian_hidden, c.sample_visible)
    if not c.stats:
        out = torch.ops.aecore.gibbs_chain(v, W, b_v, b_h, c.k, *units, rng, nh0, nh, nv)
        return GibbsChain(*out)
    out = torch.ops.aecore.cd_step(v, W, b_v, b_h, c.k, chain, *units, rng, nh0, nh, nv)
    return CDStats(*out)


def cd_update_(c: GibbsCall, velocities, lr: float, momentum: float, weight_decay: float):
    """cd_update_ on the compiled kernels: (recon_error, applied)."""
    v, W, b_v, b_h, chain, rng, nh0, nh, nv = _operands(c)
    units = (c.gaussian_visible, c.gaussian_hidden, c.sample_visible)
    out = torch.ops.aecore.cd_update_(
        v, W, b_v, b_h, *velocities, c.k, chain, *units, rng, lr, momentum, weight_decay,
        nh0, nh, nv,
    )  # fmt: skip
    increment_version([W, b_v, b_h, *velocities, *([] if chain is None else [chain])])
    return out
