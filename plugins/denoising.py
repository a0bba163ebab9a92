"""``denoising``: the denoising autoencoder of Vincent et al. (2008).

Training corrupts each batch afresh inside ``loss`` and asks the network to reconstruct
the *clean* input, so it must learn the data's structure rather than the identity.
Inference (``encode``, ``forward``) is the clean, deterministic path. The body is the
``ae`` plugin's MLP (linear path + nonlinear branch, PCA initialisation).

Corruptions (values in the model's normalised units):

* ``gaussian``: add N(0, sigma^2) noise to every element;
* ``masking``: set each element to 0 with probability ``p``;
* ``salt_pepper``: with probability ``p`` set an element to the batch's minimum or
  maximum (each with probability 1/2).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from aecore import params, plots
from aecore.base import eval_mode, squared_error
from aecore.config import DemoRecipe
from aecore.layers import flatten, pca_basis, reconstruction_from_logits
from aecore_plugins.ae import PlainAutoencoder

CORRUPTIONS = ("gaussian", "masking", "salt_pepper")
#: fixed corruptions the ``"denoising"`` anomaly score restores each row from
SCORE_CORRUPTIONS = 4
#: training rows (at most) the PCA baseline of ``aecore eval`` is fitted on
PCA_FIT_ROWS = 20000


def corrupt(
    x: torch.Tensor,
    kind: str,
    *,
    sigma: float = 0.0,
    p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A corrupted copy of ``x`` (``x`` itself is left alone); see the module docstring."""
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + sigma * noise
    hit = torch.rand(x.shape, generator=generator, device=x.device) < p
    if kind == "masking":
        return x.masked_fill(hit, 0.0)
    if kind == "salt_pepper":
        salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
        extreme = torch.where(salt, x.max(), x.min())
        return torch.where(hit, extreme, x)
    raise ValueError(f"corruption must be one of {CORRUPTIONS}; got {kind!r}")


class DenoisingAutoencoder(PlainAutoencoder):
    """The ``ae`` MLP trained to undo random corruption of its inputs."""

    demo = DemoRecipe(
        data="digits",
        latent_dim=16,
        epochs=150,
        hparams={"corruption": "masking", "p": 0.3},
    )

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        corruption="masking",
        sigma=0.3,
        p=0.3,
        **mlp_hparams,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim, **mlp_hparams)
        self.corruption = params.choice("corruption", corruption, CORRUPTIONS)
        # both are checked whatever the corruption, so a config never holds a bad value
        self.sigma = params.number("sigma", sigma, low=0.0)
        self.p = params.number("p", p, low=0.0, high=1.0)
        why = f"corruption={self.corruption!r}"
        if self.corruption == "gaussian":
            params.warn_unused(type(self), why, p=p)
        else:
            params.warn_unused(type(self), why, sigma=sigma)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "corruption": self.corruption,
            "sigma": self.sigma,
            "p": self.p,
        }

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` corrupted by this model's noise process (fresh draws on every call)."""
        return corrupt(x, self.corruption, sigma=self.sigma, p=self.p, generator=generator)

    # -- anomaly scores ------------------------------------------------------------------
    # A row unlike the training data is restored worse from a corruption too: adding the
    # task the model was trained on to the reconstruction error ("denoising") detects a
    # little better on one-class digits, but worse on the breast-cancer and wine data
    # (`aecore bench anomaly`, mean ROC-AUC over seeds 0-2, denoising against
    # reconstruction: 0.9978 / 0.9970, 0.9162 / 0.9207, 0.9821 / 0.9905), so the
    # reconstruction error is the default
    score_kinds = ("reconstruction", "denoising")
    default_score_kind = "reconstruction"
    exportable_score_kinds = score_kinds
    score_passes: ClassVar[dict[str, int]] = {"denoising": 1 + SCORE_CORRUPTIONS}

    def anomaly_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``"denoising"``: the reconstruction error of each row plus the mean error in
        restoring it from ``SCORE_CORRUPTIONS`` fixed corruptions (the same for every
        row, so a row's score depends on nothing else in its batch; salt-and-pepper
        takes each row's own minimum and maximum)."""
        return self._restoration_errors(x, x)

    def bounded_score(self, x: torch.Tensor, kind: str, compute) -> torch.Tensor:
        # both errors against the row as given, from its clipped self, as the
        # reconstruction error is: never below it, rising as the row leaves the range
        if kind != "denoising" or self.input_range is None:
            return super().bounded_score(x, kind, compute)
        return self._restoration_errors(x.clamp(*self.input_range), x)

    def _restoration_errors(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        errors = squared_error(self(inputs), target)
        for corrupted in self.fixed_corruptions(inputs):
            errors = errors + squared_error(self(corrupted), target) / SCORE_CORRUPTIONS
        return errors

    def fixed_corruptions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``SCORE_CORRUPTIONS`` corruptions of ``x`` by this model's noise process, drawn
        once from a fixed seed (numpy's legacy generator, stable across versions)."""
        rng = np.random.RandomState(0)
        shape = (SCORE_CORRUPTIONS, *x.shape[1:])
        as_x = lambda a: torch.as_tensor(a, dtype=x.dtype, device=x.device)  # noqa: E731
        if self.corruption == "gaussian":
            noise = as_x(rng.standard_normal(shape))
            return [x + self.sigma * noise[r] for r in range(SCORE_CORRUPTIONS)]
        draws = rng.random_sample(shape)
        hit = draws < self.p
        if self.p > 0:  # a value each at least: on three features p=0.3 hit none at all
            lowest = draws.reshape(SCORE_CORRUPTIONS, -1).argmin(1)
            hit.reshape(SCORE_CORRUPTIONS, -1)[np.arange(SCORE_CORRUPTIONS), lowest] = True
        if self.corruption == "masking":
            keep = as_x(~hit)
            return [x * keep[r] for r in range(SCORE_CORRUPTIONS)]
        salt = torch.as_tensor(rng.random_sample(shape) < 0.5, device=x.device)
        hit_t = torch.as_tensor(hit, device=x.device)
        rows = x.flatten(1)
        # x.shape[:1], not len(x): an int would fix the batch size of a traced graph
        shape_1 = x.shape[:1] + (1,) * (x.dim() - 1)
        low, high = rows.amin(1).reshape(shape_1), rows.amax(1).reshape(shape_1)
        return [
            torch.where(hit_t[r], torch.where(salt[r], high, low), x)
            for r in range(SCORE_CORRUPTIONS)
        ]

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits = self._logits(self.encode(self.corrupt(x)))
        # the target is the clean input
        recon = reconstruction_from_logits(logits, flatten(x), self.reconstruction, self.output)
        return {"loss": recon, "recon": recon}

    @torch.no_grad()
    def denoising_mse(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        pca: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """MSE against clean ``x`` of the corrupted inputs and of their reconstructions;
        with ``pca`` (mean, components) also of PCA's projection of the same corrupted
        inputs, the linear denoiser a denoising model has to beat."""
        with eval_mode(self):
            noisy = self.corrupt(x, generator)
            denoised = self(noisy)
        out = {
            "corrupted_mse": float((noisy - x).pow(2).mean()),
            "denoised_mse": float((denoised - x).pow(2).mean()),
        }
        if pca is not None:
            mean, comps = (t.to(x.device, torch.float64) for t in pca)
            flat = flatten(noisy).double() - mean
            projected = flat @ comps.T @ comps + mean
            out["pca_denoised_mse"] = float((projected - flatten(x).double()).pow(2).mean())
            out["denoised_vs_pca"] = out["denoised_mse"] / out["pca_denoised_mse"]
        return out

    def evaluation_metrics(self, x_test: torch.Tensor, prepared) -> dict[str, float]:
        """``aecore eval``: the corrupted test inputs, their denoised outputs and PCA's
        projection of them (PCA fitted on the training rows), each against the clean."""
        train = prepared.view("train")
        rows = np.random.default_rng(0).permutation(len(train))[:PCA_FIT_ROWS]
        pca = pca_basis(torch.as_tensor(train[np.sort(rows)]), self.latent_dim)
        return self.denoising_mse(x_test, torch.Generator().manual_seed(0), pca)

    def demo_figures(self, prepared, out_dir) -> list[tuple[str, Path]]:
        clean = torch.as_tensor(prepared.view("test").to_numpy()[:12])
        noisy = self.corrupt(clean, torch.Generator().manual_seed(0))
        with torch.no_grad(), eval_mode(self):
            denoised = self(noisy)
        path = plots.image_rows(
            [
                ("corrupted", noisy.numpy()),
                ("denoised", denoised.numpy()),
                ("clean", clean.numpy()),
            ],
            Path(out_dir) / "denoising.png",
            f"{self.corruption} corruption",
        )
        return [("test inputs: corrupted / denoised / clean", path)]
