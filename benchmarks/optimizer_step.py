"""``aecore bench kernels``'s optimizer case: one Adam step with gradient clipping as
the trainer takes it, torch's fused Adam (after the norm and its finiteness check)
against aecore's ``adam_step_`` (one call) and its reference."""

from __future__ import annotations

import torch

from aecore import ops
from aecore.ops import reference


def adam_case(device, shapes, label):
    """One optimizer step with clipping, as the trainer takes it: torch's fused Adam after
    the gradients' norm and its finiteness check, or aecore's adam_step_ (one call)."""
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=g, device=device) * 0.01 for s in shapes]
    grads = [torch.randn(s, generator=g, device=device) for s in shapes]
    leaves = [p.clone().requires_grad_() for p in params]
    for leaf, grad in zip(leaves, grads):
        leaf.grad = grad.clone()
    optimizer = torch.optim.Adam(leaves, lr=1e-4, fused=True)
    moments = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    counts = [[torch.zeros((), device=device) for _ in params] for _ in range(2)]

    def torch_step():
        norm = torch.nn.utils.get_total_norm([p.grad for p in leaves])
        if not bool(torch.isfinite(norm)):
            raise RuntimeError("non-finite gradient")
        torch.nn.utils.clip_grads_with_norm_(leaves, 1e9, norm)
        optimizer.step()

    def step(op, i):
        return lambda: op(params, grads, moments[2 * i], moments[2 * i + 1], counts[i], 1e-4,
                          max_norm=1e9)  # fmt: skip

    impls = {
        "fused": step(ops.adam_step_, 0),
        "torch.optim.Adam (fused=True)": torch_step,
        "eager reference": step(reference.adam_step_, 1),
    }
    weights = sum(p.numel() for p in params)
    return f"adam_step_ {label}, {weights:,} weights in {len(shapes)} tensors", impls


#: the ``ae`` plugin's parameters at 64 features, latent 8 (digits), and an SAE's
AE_DIGITS_SHAPES = [(256, 64), (256,), (8, 256), (8,), (256, 8), (256,), (64, 256), (64,),
                    (8, 64), (8,), (64, 8), (64,)]  # fmt: skip
SAE_SHAPES = [(16384, 512), (16384,), (16384, 512), (512,)]
