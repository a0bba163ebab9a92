"""Sparse autoencoders for interpretability (SAEs): wide dictionaries of directions
learned from a model's activations, one code base for every architecture.

``x -> z = rule(W_enc (c x - b_dec) + b_enc)``, ``x_hat = (z W_dec + b_dec) / c``: an
encoder row and a decoder row per latent (``W_enc``, ``W_dec``: (latent_dim, d)), the
sparsity rule (``aecore.sae.rules``) the only difference between architectures:

* ``sae-topk``: each row's ``k`` largest latents (Gao et al. 2024);
* ``sae-batchtopk``: the ``k * rows`` largest over a batch, one learned threshold at
  inference (Bussmann et al. 2024);
* ``sae-matryoshka``: BatchTopK whose nested prefixes of latents also reconstruct on
  their own (``prefixes``), so early latents learn general features;
* ``sae-relu``: ReLU under an L1 penalty weighted by the decoder rows' norms;
* ``sae-jumprelu``: learned per-latent thresholds under an L0 penalty (Rajamanoharan et
  al. 2024).

The training recipe, on by default and each switchable: inputs scaled to a mean square
of 1 per element, a row's mean squared norm d (``normalize_inputs``; ``c`` above, folded
into the weights when saved), the decoder bias started at the inputs' geometric median
(``b_dec_init``), tied initialisation ``W_enc = W_dec`` (``tied_init``), decoder rows
held at unit norm with the gradient's component along them removed before each step
(``unit_decoder``), AuxK for latents dead for ``dead_window`` rows (``"auto"``: 200 *
latent_dim / k, at least 10,000; ``aux_k`` of them reconstruct the residual, weight
``aux_coefficient``; top-k rules), and a learning rate scaled by ``lr_scale``:
``"auto"`` is ``1.5 * sqrt(16384 / latent_dim)``, times the trainer's ``lr`` (the
default 1e-3 gives 1.5e-3 at 16384 latents, 6e-3 at 1024: Gao et al.'s 1 / sqrt(n)
scaling), decaying linearly to zero over the last ``lr_decay`` of the run.

The loss is the reconstruction's squared error relative to the data's variance
(``fvu``: the fraction of variance unexplained, the variance measured once on the rows
that start the model) plus the rule's penalty and AuxK. ``encode`` returns the dense
(B, latent_dim) code; ``encode_sparse`` the (values, indices) of its nonzeros.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aecore import params
from aecore.base import Autoencoder, check_input_shape
from aecore.errors import ConfigError
from aecore.host_values import host_value
from aecore.sae import rules, sparse_codes
from aecore.sae.loss import sae_loss
from aecore.sae.recipe import (
    FiringTracker,
    adopt_input_statistics,
    fold_input_scale,
    geometric_median,
    input_statistics,
    remove_parallel_gradient,
    set_row_norms,
    unfold_input_scale,
)

B_DEC_INITS = ("geometric_median", "mean", "zeros")


class SparseDictionary(Autoencoder):
    """The SAE every architecture shares; a subclass names its rule (``make_rule``)."""

    input_ranks: ClassVar[tuple[int, ...]] = (1,)
    #: activations keep their geometry: no per-feature scaling before the model
    default_normalize: ClassVar[str] = "none"
    #: a dictionary is wider than its input (``aecore train`` warns of a narrower one)
    overcomplete: ClassVar[bool] = True

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        normalize_inputs=True,
        b_dec_init="geometric_median",
        tied_init=True,
        unit_decoder=True,
        aux_k="auto",
        aux_coefficient=1 / 32,
        dead_window="auto",
        lr_scale="auto",
        lr_decay=0.2,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        n, d = self.latent_dim, self.input_size
        self.normalize_inputs = params.flag("normalize_inputs", normalize_inputs)
        self.b_dec_init = params.choice("b_dec_init", b_dec_init, B_DEC_INITS)
        self.tied_init = params.flag("tied_init", tied_init)
        self.unit_decoder = params.flag("unit_decoder", unit_decoder)
        auto_aux_k = max(1, min(n, d // 2))
        if aux_k == d // 2 > n:  # "auto" as saved before it was capped at the latents
            aux_k = auto_aux_k
        # more than the latents would rank the same dead latents: refused as k is
        self.aux_k = params.integer(
            "aux_k", auto_aux_k if aux_k == "auto" else aux_k, low=1, high=n
        )
        self.aux_coefficient = params.number("aux_coefficient", aux_coefficient, low=0.0)
        self.dead_window_setting = dead_window
        if dead_window == "auto":
            dead_window = self.auto_dead_window()
        self.dead_window = params.integer("dead_window", dead_window, low=1)
        self.lr_scale_setting = lr_scale
        if lr_scale == "auto":
            lr_scale = 1.5 * math.sqrt(16384 / n)
        self.lr_scale = params.number("lr_scale", lr_scale, low=0.0, low_open=True)
        self.lr_decay = params.number("lr_decay", lr_decay, low=0.0, high=1.0)

        self.W_dec = nn.Parameter(torch.randn(n, d))
        set_row_norms(self.W_dec, 1.0)
        self.W_enc = nn.Parameter(
            self.W_dec.detach().clone() if self.tied_init else torch.empty(n, d)
        )
        if not self.tied_init:
            nn.init.kaiming_uniform_(self.W_enc, a=math.sqrt(5))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # c: inputs times c have a mean square of 1 per element (1 until init_from_data sets it)
        self.register_buffer("input_scale", torch.tensor(1.0))
        # the decoder rows' fixed norm: 1, or 1 / c once c is folded into the weights
        self.register_buffer("decoder_row_norm", torch.tensor(1.0))
        # the scaled inputs' mean squared distance from their mean: the loss divides by
        # it (a constant, so the loss is a mean over rows, equal under torchrun)
        self.register_buffer("input_variance", torch.tensor(1.0))
        # rows seen since each latent last fired: dead after dead_window of them
        self.register_buffer("since_fired", torch.zeros(n, dtype=torch.long))
        self.firing = FiringTracker()
        self.rule = self.make_rule()
        if not self.rule.uses_aux:  # a saved config holds aux_k's "auto" as its value
            given = {"aux_coefficient": aux_coefficient}
            given.update({"aux_k": aux_k} if aux_k not in ("auto", auto_aux_k) else {})
            params.warn_unused(type(self), "its rule has no AuxK term", **given)

    @abc.abstractmethod
    def make_rule(self) -> rules.SparsityRule:
        """The architecture's sparsity rule."""

    def rule_config(self) -> dict[str, Any]:
        return {}

    def get_config(self) -> dict[str, Any]:
        return {
            **self.base_config(),
            **self.rule_config(),
            "normalize_inputs": self.normalize_inputs,
            "b_dec_init": self.b_dec_init,
            "tied_init": self.tied_init,
            "unit_decoder": self.unit_decoder,
            "aux_k": self.aux_k,
            "aux_coefficient": self.aux_coefficient,
            "dead_window": self.dead_window_setting,
            "lr_scale": self.lr_scale_setting,
            "lr_decay": self.lr_decay,
        }

    def auto_dead_window(self) -> int:
        """Rows without firing after which a latent counts as dead by default."""
        return 1_000_000

    def dead_latents(self) -> Tensor:
        """Latents that fired on none of the last ``dead_window`` training rows."""
        return self.since_fired > self.dead_window

    # -- the recipe's data-dependent start and optimizer hooks --------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        c, variance = input_statistics(x, self.normalize_inputs)
        self.input_scale.fill_(c)
        self.input_variance.fill_(variance)
        x = x.flatten(1).double() * c
        if self.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x).to(self.b_dec))
        elif self.b_dec_init == "mean":
            self.b_dec.copy_(x.mean(0).to(self.b_dec))

    @property
    def needs_data_statistics(self) -> bool:
        """Weights built from another library's folder lack the input statistics (both
        1): the first fit measures them (``adopt_input_statistics``)."""
        return bool(self.input_scale == 1) and bool(self.input_variance == 1)

    def adopt_data_statistics(self, x: Tensor) -> None:
        adopt_input_statistics(self, x)

    @property
    def paced_by_run(self) -> bool:
        """Whether the steps follow the run's progress (a learning-rate decay, a top-k
        warm-up): then a resume must keep the run's epoch budget."""
        return self.lr_decay > 0 or getattr(self.rule, "topk_warmup", 0) > 0

    def lr_factor(self, progress: float) -> float:
        """``lr_scale``, decaying linearly to 0 over the last ``lr_decay`` of the run."""
        if self.lr_decay == 0:
            return self.lr_scale
        return self.lr_scale * min(1.0, (1.0 - progress) / self.lr_decay)

    def set_progress(self, progress: float) -> None:
        self.rule.progress = progress

    def before_optimizer_step(self) -> None:
        if self.unit_decoder:
            remove_parallel_gradient(self.W_dec)

    def after_optimizer_step(self) -> None:
        if self.unit_decoder:
            set_row_norms(self.W_dec, self._decoder_row_norm())
        self.firing.commit(self.since_fired)

    def _decoder_row_norm(self) -> float:
        # read once, not every step: a read waits for the device (for the optimizer, on CUDA)
        return host_value(self, "decoder_row_norm", float)

    # -- the model ------------------------------------------------------------------------
    def _scaled(self, x: Tensor) -> Tensor:
        return x.flatten(1) * self.input_scale

    def _pre(self, xs: Tensor) -> Tensor:
        return F.linear(xs - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x.to(self.W_enc.dtype)
        return self.rule.code(self._pre(self._scaled(x)))

    def decode(self, z: Tensor) -> Tensor:
        self.check_code(z)
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The code's nonzeros per row as ``(values, indices)``, both (B, m), m the most
        nonzeros of any row (rows with fewer pad with zero values); rows with NaN or
        infinite values are refused."""
        return sparse_codes.encode_sparse(self, x)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``decode`` from ``encode_sparse``'s output, touching only the chosen rows."""
        return sparse_codes.decode_sparse(self, values, indices)

    def dictionary(self) -> Tensor:
        """The learned directions in input units, one unit-norm row per latent."""
        w = self.W_dec.detach()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        return sae_loss(self, x)

    # -- evaluation -----------------------------------------------------------------------
    def evaluation_metrics(self, x_test: Tensor, prepared) -> dict[str, float]:
        """``aecore eval``: the SAE metrics, with ground truth on a superposition source."""
        from aecore.sae.evaluation import evaluation_metrics

        return evaluation_metrics(self, x_test, prepared)

    # -- saving ---------------------------------------------------------------------------
    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The state with the input scale ``c`` folded into the weights (``c`` = 1 after):
        the same function of raw inputs, what interchange formats and saved folders hold."""
        return fold_input_scale({k: v.detach().clone() for k, v in self.state_dict().items()})

    # aecore.save writes the folded form: folders and exports take raw activations
    saved_state_dict = folded_state_dict

    @staticmethod
    def restore_saved_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``aecore.load``: the input scale taken back out of the weights, so that a
        loaded SAE trains on as the one saved would have."""
        return unfold_input_scale(state)


def _k(value, latent_dim: int, input_shape) -> int:
    if isinstance(value, str) and value == "auto":
        # a code of more active latents than half the input's dimensions is no sparse one
        d = math.prod(check_input_shape(input_shape))
        return max(1, min(32, latent_dim // 4, d // 2))
    try:
        return params.integer("k", value, low=1, high=latent_dim)
    except ConfigError as exc:
        message = str(exc).replace("; got", ", or 'auto'; got")
        raise ConfigError(f"{message} (k counts active latents: at most latent_dim)") from None


class TopKSAE(SparseDictionary):
    """``sae-topk``: each row keeps its ``k`` largest latents (``"auto"``: 32, or a
    quarter of a smaller dictionary, or half the input's dimensions if fewer)."""

    def __init__(self, *, input_shape, latent_dim, k="auto", **recipe) -> None:
        n = params.integer("latent_dim", latent_dim, low=1)
        self.k = _k(k, n, input_shape)
        super().__init__(input_shape=input_shape, latent_dim=latent_dim, **recipe)

    def make_rule(self) -> rules.SparsityRule:
        return rules.TopK(self.k)

    def auto_dead_window(self) -> int:
        # 200 times the mean gap between a latent's firings (latent_dim / k rows): long
        # enough that a rare feature is not called dead, short enough that AuxK acts
        # within a run of a few million rows
        return max(10_000, 200 * self.latent_dim // self.k)

    def rule_config(self) -> dict[str, Any]:
        return {"k": self.k}


class BatchTopKSAE(TopKSAE):
    """``sae-batchtopk``: ``k`` latents per row on average, chosen over the batch.

    ``topk_warmup``: the fraction of the trainer's run that selects each row's top ``k``
    before batch selection takes over. A latent whose direction is still poor rarely
    clears the batch's threshold and learns slowly; per-row selection gives every
    latent its chance while the dictionary forms (on the superposition benchmark,
    features matched: MMCS 0.93 without it, 0.99 at 0.8). The inference threshold is
    estimated in the batch-selection phase, as a slow running average: a run of a few
    hundred steps or fewer leaves it high, so the trained model's L0 at inference is
    below ``k`` (check ``sae_metrics``'s ``l0``)."""

    def __init__(self, *, input_shape, latent_dim, k="auto", topk_warmup=0.8, **recipe):
        self.topk_warmup = params.number("topk_warmup", topk_warmup, low=0.0, high=1.0)
        super().__init__(input_shape=input_shape, latent_dim=latent_dim, k=k, **recipe)

    def make_rule(self) -> rules.SparsityRule:
        return rules.BatchTopK(self.k, self.topk_warmup)

    def rule_config(self) -> dict[str, Any]:
        return {"k": self.k, "topk_warmup": self.topk_warmup}


class MatryoshkaSAE(BatchTopKSAE):
    """``sae-matryoshka``: BatchTopK plus nested prefixes (``prefixes``: their sizes,
    the last the whole dictionary; ``"auto"``: 1/16, 1/8, 1/4, 1/2 of it and all)."""

    def __init__(
        self, *, input_shape, latent_dim, k="auto", prefixes="auto", topk_warmup=0.8, **recipe
    ) -> None:
        n = params.integer("latent_dim", latent_dim, low=1)
        if prefixes == "auto":
            prefixes = sorted({max(1, n // 2**i) for i in range(4, 0, -1)} | {n})
        self.prefixes = params.int_list("prefixes", prefixes, allow_empty=False)
        if self.prefixes != sorted(set(self.prefixes)) or self.prefixes[-1] != n:
            raise ConfigError(
                f"prefixes must be increasing sizes ending at latent_dim={n}; got {prefixes!r}"
            )
        super().__init__(
            input_shape=input_shape, latent_dim=latent_dim, k=k, topk_warmup=topk_warmup, **recipe
        )

    def make_rule(self) -> rules.SparsityRule:
        return rules.MatryoshkaBatchTopK(self.k, self.prefixes, self.topk_warmup)

    def rule_config(self) -> dict[str, Any]:
        return {"k": self.k, "prefixes": list(self.prefixes), "topk_warmup": self.topk_warmup}


class ReLUSAE(SparseDictionary):
    """``sae-relu``: ReLU latents under an L1 penalty (``l1_coefficient``) weighted by
    the decoder rows' norms. ``"auto"``, 0.1 / sqrt(d): a latent then pays its way once
    it carries about a tenth of a row's norm (1% of its variance), at any width (a fixed
    0.05 did at d = 64 and zeroed every latent at d = 128)."""

    def __init__(self, *, input_shape, latent_dim, l1_coefficient="auto", **recipe) -> None:
        self.l1_setting = l1_coefficient
        auto = 0.1 / math.sqrt(math.prod(check_input_shape(input_shape)))
        self.l1_coefficient = params.number_or_auto("l1_coefficient", l1_coefficient, auto, low=0)
        super().__init__(input_shape=input_shape, latent_dim=latent_dim, **recipe)

    def make_rule(self) -> rules.SparsityRule:
        return rules.ReLUL1(self.l1_coefficient)

    def rule_config(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_setting}


class JumpReLUSAE(SparseDictionary):
    """``sae-jumprelu``: a learned threshold per latent under an L0 penalty
    (``l0_coefficient``: a latent pays its way once it explains about that fraction of
    the variance); ``bandwidth`` is the width of the straight-through estimate of the
    thresholds' gradient. ``"auto"``: the paper's bandwidth 0.001 for inputs of unit
    mean squared norm, times sqrt(d) for this recipe's; thresholds start where penalty
    and gain balance, sqrt(l0_coefficient * d) (from 0.001 they hardly moved)."""

    def __init__(
        self, *, input_shape, latent_dim, l0_coefficient=0.01, bandwidth="auto",
        threshold="auto", **recipe,
    ) -> None:  # fmt: skip
        d = math.prod(check_input_shape(input_shape))
        self.l0_coefficient = params.number("l0_coefficient", l0_coefficient, low=0.0)
        self.settings = {"bandwidth": bandwidth, "threshold": threshold}
        self.bandwidth = params.number_or_auto(
            "bandwidth", bandwidth, 0.001 * math.sqrt(d), low=0, low_open=True
        )
        auto = max(math.sqrt(self.l0_coefficient * d), self.bandwidth)
        self.threshold = params.number_or_auto("threshold", threshold, auto, low=0, low_open=True)
        super().__init__(input_shape=input_shape, latent_dim=latent_dim, **recipe)

    def make_rule(self) -> rules.SparsityRule:
        return rules.JumpReLU(self.latent_dim, self.l0_coefficient, self.bandwidth, self.threshold)

    def rule_config(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, **self.settings}
