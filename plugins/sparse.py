"""``sparse``: an autoencoder whose code carries a sparsity penalty.

The encoder is one layer, ``code = act(W1 (x - m) + b1)`` with ``m`` the training mean;
the decoder is linear, ``W2 code + b2`` (through the output activation), plus an
optional nonlinear branch (``hidden`` widths) whose last layer starts at zero. The code
may be overcomplete (``latent_dim`` larger than the input); a sparsity constraint, not a
bottleneck, stops it from copying the input. Three penalties:

* ``kl``: Ng's sparse autoencoder (CS294A notes): sigmoid units, plus
  ``beta * sum_j KL(rho || mean activation of unit j)`` (``aecore.ops.kl_sparsity``);
* ``l1``: ``l1_lambda`` times the mean over examples of the summed absolute activations;
* ``topk``: the k-sparse autoencoder of Makhzani & Frey (2013): keep the ``k`` largest
  codes of each example, zero the rest (``aecore.ops.topk_sparsify``); at inference
  ``encode`` keeps ``round(alpha * k)`` of them (their alpha > 1 option).

The objective is Ng's: half the summed squared error per example,
``(input_size / 2) * recon`` where ``recon`` is the per-element MSE logged beside it,
plus the penalty, plus ``weight_decay / 2`` times the squared weights (not biases).
So Ng's settings (rho=0.01, beta=3, weight_decay=1e-4) mean what they mean in his notes.
``loss`` also logs ``mean_activation`` and ``dead_fraction``: the share of code units
whose magnitude stays at or below 1e-3 on every example of the batch.

The defaults follow the code size. An overcomplete code gets Ng's model (``kl``, one
layer each way). An undercomplete code, where PCA is the best any linear decoder can
do, gets a linear code with the ``l1`` penalty, started at PCA's solution
(``pca_start``) with a nonlinear decoder branch (``hidden=[256]``) beside the linear
decoder: it begins at PCA's reconstruction and trades it for sparsity only as far as
that pays. The resolved values are what ``get_config`` records.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from aecore import ops, params, plots
from aecore.base import Autoencoder, eval_mode
from aecore.config import DemoRecipe
from aecore.errors import ConfigError, IgnoredSettingWarning, warn
from aecore.layers import ACTIVATIONS, OUTPUT_ACTIVATIONS, flatten, init_pca_path, mlp, zero_
from aecore.layers import activation as make_activation
from aecore.layers import output_activation as make_output

PENALTIES = ("kl", "l1", "topk")
#: the hidden activation each penalty gets with ``activation="auto"``
DEFAULT_ACTIVATION = {"kl": "sigmoid", "l1": "relu", "topk": "identity"}
#: a unit is dead on a batch when its activation magnitude never exceeds this
DEAD_THRESHOLD = 1e-3


@torch.no_grad()
def activity(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean activation of codes ``h`` (B, latent_dim) and the fraction of dead units:
    those whose magnitude stays at or below DEAD_THRESHOLD on every row."""
    return {
        "mean_activation": h.mean(),
        "dead_fraction": (h.abs().amax(0) <= DEAD_THRESHOLD).float().mean(),
    }


class SparseAutoencoder(Autoencoder):
    """Encoder ``x -> act(W1 (x - m) + b1)`` with ``m`` the training mean (k-sparsified
    for ``topk``), decoder ``h -> out(W2 h + b2 + branch(h))``; ``h`` is the code."""

    pca_start = True  # with its defaults, for undercomplete codes (see the module docs)
    # saved before these existed: one linear layer each way, random start
    legacy_defaults: ClassVar[dict] = {"pca_start": False, "hidden": []}

    # Ng's exercise: 64 -> 100 sigmoid units on 8x8 natural-image patches
    demo = DemoRecipe(
        data="patches",
        latent_dim=100,
        # Ng's exercise: full-batch L-BFGS (20 steps of up to 20 iterations)
        epochs=20,
        batch_size=10000,
        lr=1.0,
        optimizer="lbfgs",
        normalize="none",  # the patches come scaled to [0.1, 0.9] for sigmoid outputs
        hparams={
            "penalty": "kl",
            "rho": 0.01,
            "beta": 3.0,
            "weight_decay": 1e-4,
            "output_activation": "sigmoid",
        },
    )

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        penalty="auto",
        rho=0.05,
        beta=3.0,
        l1_lambda=1e-3,
        k=None,
        alpha=1.0,
        activation="auto",
        output_activation="identity",
        weight_decay=0.0,
        pca_start="auto",
        hidden="auto",
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        undercomplete = self.latent_dim < self.input_size
        if penalty == "auto":
            penalty = "l1" if undercomplete else "kl"
        self.penalty = params.choice("penalty", penalty, PENALTIES)
        self.rho = params.number("rho", rho, low=0.0, high=1.0, low_open=True, high_open=True)
        self.beta = params.number("beta", beta, low=0.0)
        self.l1_lambda = params.number("l1_lambda", l1_lambda, low=0.0)
        if k is None:
            k = max(1, self.latent_dim // 4)
        try:
            self.k = params.integer("k", k, low=1, high=self.latent_dim)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} (k counts kept code units: at most latent_dim={self.latent_dim})"
            ) from None
        self.alpha = params.number("alpha", alpha, low=1.0)
        if round(self.alpha * self.k) > self.latent_dim:
            raise ConfigError(
                f"alpha must be in [1, {self.latent_dim / self.k:g}] so that round(alpha * k) "
                f"codes fit in latent_dim={self.latent_dim} (k={self.k}); got {alpha!r}"
            )
        _warn_other_penalties_settings(
            self.penalty, rho=rho, beta=beta, l1_lambda=l1_lambda, alpha=alpha,
            k=None if k == max(1, self.latent_dim // 4) else k,
        )  # fmt: skip
        if activation == "auto":
            linear_code = undercomplete and self.penalty == "l1" and pca_start in ("auto", True)
            activation = "identity" if linear_code else DEFAULT_ACTIVATION[self.penalty]
        self.activation = params.choice("activation", activation, ["auto", *ACTIVATIONS])
        if self.penalty == "kl" and self.activation != "sigmoid":
            raise ConfigError(
                "penalty='kl' needs activation='sigmoid' (or 'auto'): the KL penalty compares "
                f"mean activations in (0, 1) with rho; got activation={activation!r}"
            )
        self.output_activation = params.choice(
            "output_activation", output_activation, OUTPUT_ACTIVATIONS
        )
        self.weight_decay = params.number("weight_decay", weight_decay, low=0.0)
        # PCA's coordinates fill a linear, dense code narrower than the input
        can_start_at_pca = undercomplete and self.activation == "identity" and penalty == "l1"
        if pca_start == "auto":
            pca_start = can_start_at_pca
        if not isinstance(pca_start, bool):
            raise ConfigError(f"pca_start must be true, false or 'auto'; got {pca_start!r}")
        if pca_start and not can_start_at_pca:
            raise ConfigError(
                "pca_start=true needs an undercomplete code (latent_dim < input size), "
                f"activation='identity' and penalty='l1'; got latent_dim={self.latent_dim}, "
                f"input size {self.input_size}, activation={self.activation!r}, "
                f"penalty={self.penalty!r}"
            )
        self.pca_start = pca_start
        if hidden == "auto":
            hidden = [256] if pca_start else []
        self.hidden = params.int_list("hidden", hidden)

        self.encoder = nn.Linear(self.input_size, self.latent_dim)
        # the encoder sees inputs minus the training mean (set by init_from_data): the same
        # model class (the bias can absorb it), but Adam no longer turns the filters' flat
        # component into a second bias, so the filters show only what the data varies in
        self.register_buffer("input_mean", torch.zeros(self.input_size))
        self.decoder = nn.Linear(self.latent_dim, self.input_size)
        self.hidden_activation = make_activation(self.activation)
        self.output = make_output(self.output_activation)
        # a nonlinear correction beside the linear decoder: what lets an undercomplete
        # code reconstruct better than PCA, which bounds every linear decoder
        self.decoder_mlp = (
            mlp([self.latent_dim, *self.hidden, self.input_size], "relu") if self.hidden else None
        )

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "penalty": self.penalty,
            "rho": self.rho,
            "beta": self.beta,
            "l1_lambda": self.l1_lambda,
            "k": self.k,
            "alpha": self.alpha,
            "activation": self.activation,
            "output_activation": self.output_activation,
            "weight_decay": self.weight_decay,
            "pca_start": self.pca_start,
            "hidden": list(self.hidden),
        }

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        self.input_mean.copy_(flatten(x).mean(0).to(self.input_mean))
        if self.pca_start:  # the code starts as PCA's coordinates of the centred input
            init_pca_path(self.encoder, self.decoder, flatten(x))
            self.encoder.bias.zero_()  # the encoder sees x - mean already
        if self.decoder_mlp is not None:
            zero_(self.decoder_mlp[-1])

    @property
    def input_range(self) -> tuple[float, float] | None:
        return None if self.output_activation == "identity" else (0.0, 1.0)

    @property
    def inference_k(self) -> int:
        """How many codes ``encode`` keeps with the ``topk`` penalty: round(alpha * k)."""
        return round(self.alpha * self.k)

    def _hidden(self, x: torch.Tensor, k: int) -> torch.Tensor:
        self.check_input(x)
        h = self.hidden_activation(self.encoder(flatten(x) - self.input_mean))
        return ops.topk_sparsify(h, k) if self.penalty == "topk" else h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._hidden(x, self.inference_k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        out = self.decoder(z)
        if self.decoder_mlp is not None:
            out = out + self.decoder_mlp(z)
        return self.output(out).reshape(-1, *self.input_shape)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self._hidden(x, self.k)
        recon = (self.decode(h) - x).pow(2).mean()
        if self.penalty == "kl":
            sparsity = ops.kl_sparsity(h, self.rho, self.beta)
        elif self.penalty == "l1":
            sparsity = self.l1_lambda * h.abs().sum(1).mean()
        else:  # topk: the constraint is in the code itself
            sparsity = h.new_zeros(())
        decay = (
            0.5
            * self.weight_decay
            * (self.encoder.weight.square().sum() + self.decoder.weight.square().sum())
        )
        loss = 0.5 * self.input_size * recon + sparsity + decay
        return {
            "loss": loss,
            "recon": recon,
            "sparsity": sparsity,
            "weight_decay": decay,
            **activity(h),
        }

    @torch.no_grad()
    def evaluation_metrics(self, x_test: torch.Tensor, prepared) -> dict[str, float]:
        """The code's activity on the whole test split (``aecore eval``)."""
        with eval_mode(self):
            h = self.encode(x_test)
        terms = activity(h)
        if self.penalty != "kl":  # sigmoid codes are never exactly zero
            terms["nonzero_fraction"] = (h != 0).float().mean()
        return {name: float(value) for name, value in terms.items()}

    def filters(self) -> torch.Tensor:
        """Each code unit's input weights, shaped like an input: (latent_dim, *input_shape)."""
        return self.encoder.weight.detach().reshape(self.latent_dim, *self.input_shape)

    def demo_figures(self, prepared, out_dir) -> list[tuple[str, Path]]:
        filters = self.filters().cpu().numpy()
        if plots.as_images(filters) is None:
            return []  # not image-shaped inputs: nothing to draw
        path = plots.filter_grid(
            filters, Path(out_dir) / "filters.png", f"{self.latent_dim} {self.penalty} filters"
        )
        return [("encoder filters (one per code unit)", path)]


#: each penalty's own settings, and their defaults
PENALTY_SETTINGS = {
    "kl": {"rho": 0.05, "beta": 3.0},
    "l1": {"l1_lambda": 1e-3},
    "topk": {"k": None, "alpha": 1.0},
}


def _warn_other_penalties_settings(penalty: str, **given) -> None:
    """A setting of another penalty than the one in use has no effect: say so."""
    unused = [
        f"{name}={given[name]!r} ({other})"
        for other, settings in PENALTY_SETTINGS.items()
        if other != penalty
        for name, default in settings.items()
        if given[name] != default
    ]
    if unused:
        warn(
            f"penalty={penalty!r} does not use {', '.join(unused)}: pass the penalty those "
            f"settings belong to, or leave them out",
            IgnoredSettingWarning,
        )
