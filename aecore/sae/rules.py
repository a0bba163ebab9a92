"""Sparsity rules: how a sparse autoencoder turns its latents' pre-activations into the
sparse code, and the penalty each adds to the training loss. The SAE architectures
differ only here.

* :class:`TopK` keeps each row's ``k`` largest pre-activations (ReLU'd): Gao et al.
  2024. The selection is :func:`aecore.ops.topk_sparsify`, the op the ``sparse``
  plugin's top-k code uses.
* :class:`BatchTopK` keeps the ``k * rows`` largest over the whole batch (Bussmann et
  al. 2024); at inference a single threshold, estimated during training, replaces the
  batch (a JumpReLU with one threshold for all latents).
* :class:`MatryoshkaBatchTopK`: BatchTopK whose loss also asks nested prefixes of the
  latents to reconstruct on their own (Bussmann et al. 2025; Nabeshima 2024).
* :class:`ReLUL1`: a ReLU code under an L1 penalty weighted by the decoder rows' norms
  (Bricken et al. 2023; Conerly et al. 2024).
* :class:`JumpReLU`: a per-latent learned threshold, trained through straight-through
  estimators of its gradient, under an L0 penalty (Rajamanoharan et al. 2024).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aecore import ops


class SparsityRule(nn.Module, abc.ABC):
    """Pre-activations (B, n) -> code (B, n), and the rule's penalty terms."""

    #: the rule's name in configs and interchange formats
    name: ClassVar[str] = ""
    #: whether AuxK (dead latents reconstructing the residual) applies to this rule
    uses_aux: ClassVar[bool] = False
    #: whether :meth:`penalty` adds terms (it then gets the decoder rows' norms)
    penalised: ClassVar[bool] = False

    @abc.abstractmethod
    def code(self, pre: Tensor) -> Tensor:
        """The sparse code for pre-activations ``pre``."""

    def row_k(self) -> int | None:
        """``k`` while this rule's training code is each row's ``k`` largest ReLU'd
        pre-activations and has no penalty."""
        return None

    def sparse_training_code(
        self, xs: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, aux_k: int = 0, dead=None
    ) -> tuple[Tensor, ...] | None:
        """The training code as ``(values, indices)`` (B, m) from the sparse kernels
        (``aecore.ops.topk_encode``), which never form the (B, n) pre-activations; with
        ``dead`` (a mask of dead latents), also AuxK's ``(aux_values, aux_indices)`` from
        the same pass. None when this rule needs the pre-activations (the model then
        computes densely)."""
        k = self.row_k()
        if k is None:
            return None
        # check_finite=False: a NaN pre-activation makes the code NaN rather than raising
        # mid-step (a flag read back, a wait on CUDA); the NaN loss that follows is what
        # the trainer's one finiteness check a step reports
        return ops.topk_encode(
            xs, W_enc, b_enc, b_dec, k, aux_k=aux_k, dead=dead, check_finite=False
        )

    def penalty(self, code: Tensor, pre: Tensor, decoder_norms: Tensor) -> dict[str, Tensor]:
        """Named loss terms (each already weighted) that the model adds to its loss."""
        return {}

    def scale_codes(self, factor: float) -> None:
        """Keep the rule's function when every pre-activation is ``factor`` (> 0) times
        what it was: the thresholds in code units follow."""

    def thresholds(self, n: int) -> Tensor | None:
        """Per-latent inference thresholds, for formats that store a JumpReLU."""
        return None


class TopK(SparsityRule):
    name = "topk"
    uses_aux = True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def code(self, pre: Tensor) -> Tensor:
        return ops.topk_sparsify(pre, self.k).relu()

    def row_k(self) -> int | None:
        return self.k


def _global_rows(rows: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    total = torch.tensor([rows], device=device)
    dist.all_reduce(total)
    return int(total)


def _batch_threshold(values: Tensor, keep: int) -> Tensor:
    """The ``keep``-th largest of ``values`` over every process's batch: each process's
    own top ``keep`` holds all of its share of the global top, so gathering those
    suffices (and under torchrun the selection equals one process's on the whole batch)."""
    flat = values.detach().flatten()
    local = flat.topk(min(keep, flat.numel())).values
    if dist.is_available() and dist.is_initialized():
        sizes = [
            torch.zeros((), dtype=torch.long, device=flat.device)
            for _ in range(dist.get_world_size())
        ]
        dist.all_gather(sizes, torch.tensor(local.numel(), device=flat.device))
        padded = torch.full((int(max(sizes)),), -torch.inf, device=flat.device, dtype=flat.dtype)
        padded[: local.numel()] = local
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded)
        local = torch.cat(gathered).topk(keep).values
    return local[min(keep, local.numel()) - 1]


class BatchTopK(SparsityRule):
    name = "batchtopk"
    uses_aux = True
    #: weight of each new batch in the running threshold estimate, once warmed up
    THRESHOLD_RATE = 0.01

    def __init__(self, k: int, topk_warmup: float = 0.0) -> None:
        super().__init__()
        self.k = k
        self.topk_warmup = topk_warmup
        # how far through its run training is (set by the model's set_progress): before
        # topk_warmup, training selects per row
        self.progress = 1.0
        # the inference threshold: a running mean of the smallest activation each training
        # batch kept (0 until the first training batch: a plain ReLU)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    def code(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        if not self.training:
            return acts * (acts > self.threshold)
        if not len(pre):  # no rows: nothing to select (and no batch to estimate from)
            return acts
        keep = self.k * _global_rows(len(pre), pre.device)
        cut = _batch_threshold(acts, keep)
        mask = (acts >= cut) & (acts > 0)
        if torch.is_grad_enabled():
            # the warm-up selects per row, but the batch rule's cut still trains the
            # inference threshold: a run that ends in the warm-up has one
            self._update_threshold(acts.detach(), mask)
            if self.progress < self.topk_warmup:
                return ops.topk_sparsify(pre, self.k).relu()
        return acts * mask

    def row_k(self) -> int | None:
        return self.k if self.training and self.progress < self.topk_warmup else None

    #: candidates per row of the sparse batch selection, as a multiple of k
    SPARSE_CANDIDATES = 4

    def sparse_training_code(
        self, xs: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, aux_k: int = 0, dead=None
    ) -> tuple[Tensor, ...] | None:
        warm = self.row_k() is not None  # the warm-up selects each row's k
        if not warm and torch.compiler.is_compiling():
            return None  # its exactness check reads a flag back: the dense path compiles
        # The batch's top k * rows from each row's top m candidates: exact unless a row
        # keeps all of its m (then entries past them might pass the cut, and every
        # process computes this batch densely instead)
        n = W_enc.shape[0]
        # no more candidates than the fused encoder keeps per row (CUDA's heaps): past
        # that it would build the (B, n) matrix; fewer only makes truncation likelier
        m = min(n, max(self.k, min(self.SPARSE_CANDIDATES * self.k, ops.topk_encode_max_k(xs))))
        values, indices, *aux_code = ops.topk_encode(
            xs, W_enc, b_enc, b_dec, m, aux_k=aux_k, dead=dead, check_finite=False
        )  # NaN codes for NaN pre-activations, as above
        cut = _batch_threshold(values, self.k * _global_rows(len(xs), xs.device))
        if warm:  # the batch rule's cut (from the candidates) trains the threshold still
            self._update_threshold(values.detach(), (values.detach() >= cut) & (values > 0))
            row_top = torch.arange(m, device=values.device) < self.k
            return values * (row_top & (values.detach() > 0)), indices, *aux_code
        last = values.detach()[:, -1]
        truncated = (
            ((last >= cut) & (last > 0)).any() if m < n else last.new_zeros((), dtype=torch.bool)
        )
        if dist.is_available() and dist.is_initialized():
            flag = truncated.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            truncated = flag.bool()
        if bool(truncated):
            return None
        mask = (values.detach() >= cut) & (values.detach() > 0)
        self._update_threshold(values.detach(), mask)
        return values * mask, indices, *aux_code

    @torch.no_grad()
    def _update_threshold(self, values: Tensor, kept: Tensor) -> None:
        """The running estimate moved towards the smallest of ``values`` where ``kept``
        (over every process: each calls this, kept values or not). All on the device:
        nothing is read back (a batch that kept nothing leaves the estimate alone)."""
        smallest = self.threshold.new_tensor(torch.inf)
        if values.numel():
            smallest = torch.where(kept, values, torch.inf).amin().to(smallest)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        counted = torch.isfinite(smallest)
        self.threshold_batches += counted
        # a plain mean over the first batches, then an exponential moving average
        batches = self.threshold_batches.clamp(min=1).to(torch.float64)
        rate = (1.0 / batches).clamp(min=self.THRESHOLD_RATE).to(smallest)
        self.threshold.add_(torch.where(counted, rate * (smallest - self.threshold), 0.0))

    def thresholds(self, n: int) -> Tensor | None:
        return self.threshold.expand(n).clone()

    @torch.no_grad()
    def scale_codes(self, factor: float) -> None:
        self.threshold.mul_(factor)


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka"

    def __init__(self, k: int, prefixes: list[int], topk_warmup: float = 0.0) -> None:
        super().__init__(k, topk_warmup)
        self.prefixes = prefixes


class ReLUL1(SparsityRule):
    name = "relu"
    penalised = True

    def __init__(self, l1_coefficient: float) -> None:
        super().__init__()
        self.l1_coefficient = l1_coefficient

    def code(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def penalty(self, code: Tensor, pre: Tensor, decoder_norms: Tensor) -> dict[str, Tensor]:
        # weighted by the rows' norms, the penalty cannot be dodged by shrinking codes
        # while growing decoder rows
        l1 = (code * decoder_norms).sum(1).mean()
        return {"l1": self.l1_coefficient * l1}


class _JumpReLUFunction(torch.autograd.Function):
    """``pre * H(pre - threshold)``; the threshold's gradient through a rectangle-kernel
    estimate of the step's derivative (the step itself has none)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / bw) * near * grad
        return grad_pre, grad_threshold.sum(0), None


class _StepFunction(torch.autograd.Function):
    """``H(pre - threshold)`` with the same estimate of the threshold's gradient."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        return None, (-(1.0 / bw) * near * grad).sum(0), None


class JumpReLU(SparsityRule):
    name = "jumprelu"
    penalised = True

    def __init__(self, n: int, l0_coefficient: float, bandwidth: float, threshold: float) -> None:
        super().__init__()
        self.l0_coefficient = l0_coefficient
        self.bandwidth = bandwidth
        # in log space: the threshold stays positive whatever the optimizer does
        self.log_threshold = nn.Parameter(torch.full((n,), float(threshold)).log())

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def code(self, pre: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return pre * (pre > self.threshold)
        return _JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)

    def penalty(self, code: Tensor, pre: Tensor, decoder_norms: Tensor) -> dict[str, Tensor]:
        if not torch.is_grad_enabled():
            l0 = (pre > self.threshold).sum(1).float().mean()
        else:
            l0 = _StepFunction.apply(pre, self.threshold, self.bandwidth).sum(1).mean()
        return {"l0_penalty": self.l0_coefficient * l0}

    @torch.no_grad()
    def scale_codes(self, factor: float) -> None:
        self.log_threshold.add_(math.log(factor))

    def thresholds(self, n: int) -> Tensor | None:
        return self.threshold.detach().clone()
