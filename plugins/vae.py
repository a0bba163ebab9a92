"""``vae``: the variational autoencoder of Kingma & Welling (2014), trained by SGVB.

The encoder gives a diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)));
the loss draws one reparameterised z = mean + std * eps per input and minimises
``recon + beta * kl``, where ``recon`` is -log p(x|z) summed over the input features
and ``kl`` = KL(q(z|x) || N(0, I)) in closed form, both in nats per input. ``beta != 1``
gives a beta-VAE (Higgins et al. 2017); ``warmup_steps`` ramps beta linearly from 0 over
that many training steps (Sønderby et al. 2016; Bowman et al. 2016).

The decoder is Bernoulli (the net outputs logits; ``decode`` returns probabilities, and
inputs must lie in [0, 1], e.g. ``--normalize minmax``) or Gaussian with a learned
per-feature standard deviation (``decoder_std="learned"``, floored at ``min_decoder_std``
so constant pixels cannot drive the likelihood to infinity) or a fixed one
(``decoder_std=0.1``). ``encode`` returns the posterior mean: ``model(x)`` is
deterministic, and it is what ONNX exports.

``elbo(x)`` and ``log_likelihood(x, k)`` (importance-weighted, Burda et al. 2016) are
nats per input; the anomaly score is -log p(x) from ``score_draws`` fixed draws.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from aecore import params, plots
from aecore.base import Autoencoder, eval_mode
from aecore.config import DemoRecipe
from aecore.errors import ConfigError, DataError
from aecore.layers import (
    ACTIVATIONS,
    LOG_2PI,
    fixed_normal_draws,
    flatten,
    gaussian_latent_estimate,
    kl_to_standard_normal,
    mlp,
    reparameterised_draws,
    sample_chunks,
)
from aecore_plugins.conv import ConvAutoencoder

DECODERS = ("bernoulli", "gaussian")
BACKBONES = ("mlp", "conv")
_EVAL_SAMPLES = 16  # posterior samples per input in an eval-mode (validation) loss
#: test rows (at most) of the k = 1000 log-likelihood in ``aecore eval``
EVAL_LL_ROWS = 2000
_ROW_BATCH = 512  # inputs per batch in elbo / log_likelihood


class VariationalAutoencoder(Autoencoder):
    """VAE with an MLP (any input shape) or convolutional (``(C, H, W)``) backbone."""

    # the README's quality recipe (test log-likelihood on digits)
    demo = DemoRecipe(data="digits", latent_dim=8, epochs=500, batch_size=128, lr=1e-3)

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        backbone="mlp",
        hidden=(256, 256),
        activation="tanh",
        channels=(32, 64),
        kernel_size=3,
        decoder="bernoulli",
        decoder_std="learned",
        min_decoder_std=1e-3,
        beta=1.0,
        warmup_steps=0,
        score_draws=10,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.backbone = params.choice("backbone", backbone, BACKBONES)
        self.hidden = params.int_list("hidden", hidden)
        self.activation = params.choice("activation", activation, list(ACTIVATIONS))
        self.channels = params.int_list("channels", channels, allow_empty=False)
        self.kernel_size = params.integer("kernel_size", kernel_size, low=2)
        self.decoder = params.choice("decoder", decoder, DECODERS)
        if decoder_std != "learned":
            try:
                decoder_std = params.number("decoder_std", decoder_std, low=0.0, low_open=True)
            except ConfigError:
                raise ConfigError(
                    f"decoder_std must be 'learned' or a number in (0, inf) (a fixed "
                    f"Gaussian standard deviation); got {decoder_std!r}"
                ) from None
            if self.decoder != "gaussian":
                raise ConfigError(
                    f"decoder_std={decoder_std!r} applies to decoder='gaussian' only; "
                    f"got decoder={decoder!r} (a Bernoulli decoder has no scale)"
                )
        self.decoder_std = decoder_std
        self.min_decoder_std = params.number(
            "min_decoder_std", min_decoder_std, low=0.0, low_open=True
        )
        self.beta = params.number("beta", beta, low=0.0)
        self.warmup_steps = params.integer("warmup_steps", warmup_steps, low=0)
        # None: the counts of folders saved before this setting (ELBO 10, likelihood 100)
        if score_draws is not None:
            score_draws = params.integer("score_draws", score_draws, low=1)
        self.score_draws = score_draws
        mlp_only, conv_only = {"hidden": hidden}, {"channels": channels, "kernel_size": kernel_size}
        unused = conv_only if self.backbone == "mlp" else mlp_only
        params.warn_unused(type(self), f"backbone={self.backbone!r}", **unused)
        if not self._learned_std:
            why = "the decoder has no learned scale"
            params.warn_unused(type(self), why, min_decoder_std=min_decoder_std)
        if self.backbone == "conv" and len(self.input_shape) != 3:
            raise ConfigError(
                f"backbone='conv' needs a 3-D input_shape (C, H, W); got "
                f"input_shape={self.input_shape} ({len(self.input_shape)}-D): for rows of "
                f"features use backbone='mlp'; for images train on (C, H, W) arrays (on the "
                f"command line an image source, e.g. --data digits:image)"
            )
        # a learned Gaussian scale doubles the decoder's output: (loc, raw scale) per feature
        self.outputs_per_feature = 2 if self._learned_std else 1
        if self.backbone == "mlp":
            self.encoder_body, features, self.decoder_net = self._mlp_backbone()
        else:
            self.encoder_body, features, self.decoder_net = self._conv_backbone()
        self.encoder_head = nn.Linear(features, 2 * self.latent_dim)
        # training steps taken so far (loss calls in training mode): drives the KL warm-up
        # and, being a buffer, is saved in checkpoints so a resumed run continues exactly
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.int64))
        # the anomaly scores' draws, shared by all rows: a constant an ONNX export holds
        draws = fixed_normal_draws(max(self.score_passes.values()), self.latent_dim, seed=0)
        self.register_buffer("fixed_draws", draws, persistent=False)

    @classmethod
    def real_valued_hparams(cls, given: dict) -> dict:
        # one-class cancer / wine / iris: mean ROC-AUC 0.944 / 0.982 / 0.997 against 0.918 /
        # 0.745 / 0.878 from the Bernoulli decoder on min-max scaled, clipped rows
        return {} if "decoder" in given else {"decoder": "gaussian"}

    def _mlp_backbone(self) -> tuple[nn.Module, int, nn.Module]:
        """Encoder body (inputs -> features), its width, and the decoder (codes -> flat
        outputs), as MLPs over flattened inputs."""
        sizes = [self.input_size, *self.hidden]
        body = nn.Sequential(nn.Flatten(), mlp(sizes, self.activation, final_activation=True))
        out = self.outputs_per_feature * self.input_size
        decoder = mlp([self.latent_dim, *reversed(self.hidden), out], self.activation)
        return body, sizes[-1], decoder

    def _conv_backbone(self) -> tuple[nn.Module, int, nn.Module]:
        """The same three pieces from the ``conv`` plugin's layer stacks: its strided
        convolutions as the encoder body; its linear map and transposed convolutions,
        built for ``outputs_per_feature`` times the input channels, as the decoder."""
        c, h, w = self.input_shape
        stacks = {"channels": self.channels, "kernel_size": self.kernel_size,
                  "activation": self.activation, "linear_path": False}  # fmt: skip
        # only the layer stacks are kept; the rest of these two models is discarded
        enc = ConvAutoencoder(input_shape=self.input_shape, latent_dim=self.latent_dim, **stacks)
        dec = ConvAutoencoder(
            input_shape=(self.outputs_per_feature * c, h, w), latent_dim=self.latent_dim, **stacks
        )
        body = nn.Sequential(enc.encoder_convs, nn.Flatten())
        decoder = nn.Sequential(
            dec.decoder_linear,
            nn.Unflatten(1, dec.feature_shape),
            dec.decoder_convs,
            nn.Flatten(),  # (B, m*C, H, W) -> (B, m*C*H*W): channel groups stay contiguous
        )
        return body, enc.encoder_linear.in_features, decoder

    @property
    def input_range(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.decoder == "bernoulli" else None

    @property
    def _learned_std(self) -> bool:
        return self.decoder == "gaussian" and self.decoder_std == "learned"

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "backbone": self.backbone,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "decoder": self.decoder,
            "decoder_std": self.decoder_std,
            "min_decoder_std": self.min_decoder_std,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
            "score_draws": self.score_draws,
        }

    # -- the model ------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x), each ``(B, latent_dim)``."""
        self.check_input(x)
        return self.encoder_head(self.encoder_body(x)).chunk(2, dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def _decoder_output(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat ``(B, D)`` logits (Bernoulli) or means (Gaussian), and the Gaussian
        standard deviation (``(B, D)`` when learned, None otherwise)."""
        self.check_code(z)
        out = self.decoder_net(z).reshape(z.shape[0], self.outputs_per_feature, self.input_size)
        if not self._learned_std:
            return out[:, 0], None
        return out[:, 0], self.min_decoder_std + F.softplus(out[:, 1])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean: Bernoulli probabilities or Gaussian means."""
        loc, _ = self._decoder_output(z)
        if self.decoder == "bernoulli":
            loc = torch.sigmoid(loc)
        return loc.reshape(-1, *self.input_shape)

    def _log_px(self, x_flat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per row, summed over features. ``z`` may hold several samples per
        input as ``(S * B, latent_dim)``; ``x_flat`` is ``(B, D)``."""
        loc, std = self._decoder_output(z)
        loc = loc.reshape(-1, *x_flat.shape)
        if self.decoder == "bernoulli":
            # log Bernoulli(x; sigmoid(l)) = -BCE(l, x); the cross-entropy form also holds
            # for grey values in [0, 1], the usual convention for such data
            logp = -F.binary_cross_entropy_with_logits(loc, x_flat.expand_as(loc), reduction="none")
        else:
            if std is None:  # fixed
                std = torch.tensor(self.decoder_std, dtype=loc.dtype, device=loc.device)
            std = std.reshape(-1, *x_flat.shape) if std.dim() else std
            logp = -0.5 * ((x_flat - loc) / std).pow(2) - torch.log(std) - 0.5 * LOG_2PI
        return logp.sum(-1).reshape(-1)

    def _check_range(self, x: torch.Tensor) -> None:
        if self.decoder == "bernoulli" and x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"decoder='bernoulli' needs inputs in [0, 1] (normalize with 'minmax'); "
                    f"got values in [{lo:.4g}, {hi:.4g}]"
                )

    def current_beta(self) -> float:
        """The KL weight of the next training step (ramped during warm-up)."""
        if self.warmup_steps == 0:
            return self.beta
        done = int(self.steps_taken)
        return self.beta * min(1.0, (done + 1) / self.warmup_steps)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """SGVB: ``recon + beta * kl`` with one reparameterised sample per input, nats
        per input. In eval mode (validation) beta is the full value, so validation
        losses stay comparable through the warm-up."""
        mean, logvar = self.posterior(x)
        self._check_range(x)
        # validation averages several draws: early stopping then follows the model, not
        # the noise of one sample per input
        n = 1 if self.training else _EVAL_SAMPLES
        z = reparameterised_draws(mean, logvar, n, None)[0].reshape(-1, self.latent_dim)
        recon = -self._log_px(flatten(x), z).mean()
        kl = kl_to_standard_normal(mean, logvar).mean()
        beta = self.current_beta() if self.training else self.beta
        terms = {"loss": recon + beta * kl, "recon": recon, "kl": kl}
        if self.warmup_steps:
            terms["beta"] = torch.tensor(beta)
        if self.training:
            self.steps_taken += 1
        return terms

    # -- likelihood estimates: -log p(x) detects anomalies better than the reconstruction
    # error (`aecore bench anomaly`); from 10 draws a row it ranks rows as from 100 (mean
    # ROC-AUC 0.981 on digits, 0.972 on breast cancer, either way) at a tenth of the cost
    score_kinds = ("reconstruction", "elbo", "log_likelihood")
    default_score_kind = "log_likelihood"
    exportable_score_kinds = score_kinds
    legacy_defaults: ClassVar[dict] = {"score_draws": None}
    renamed_buffers: ClassVar[dict] = {"score_draws": "fixed_draws"}
    scoring_hparams = ("score_draws",)  # a resumed run may score from other draws

    @property
    def score_passes(self) -> dict[str, int]:  # draws a row
        return {"elbo": self.score_draws or 10, "log_likelihood": self.score_draws or 100}

    def anomaly_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        # the draws the export's score graph holds (traceable_score)
        return -self._per_row_batch(x, kind, self.score_passes[kind], None, None, self.fixed_draws)

    def traceable_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "reconstruction":
            return super().traceable_score(x, kind)
        mean, logvar = self.posterior(x)
        eps = self.fixed_draws[: self.score_passes[kind]].to(mean.dtype)
        return -self._estimate(kind, flatten(x), mean, logvar, [eps]).to(x.dtype)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, samples: int = 1, *, generator=None, seed=None) -> torch.Tensor:
        """Evidence lower bound per input, ``(B,)`` nats: E_q[log p(x|z)] (averaged over
        ``samples`` draws) minus the closed-form KL. Always with beta = 1. With ``seed``,
        every row uses the same seeded draws: a row's estimate depends on it alone."""
        samples = params.integer("samples", samples, low=1)
        return self._per_row_batch(x, "elbo", samples, generator, seed)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int = 1000, *, generator=None, seed=None):
        """Importance-weighted estimate of log p(x) per input, ``(B,)`` nats (Burda et
        al. 2016): log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x). A lower bound in
        expectation that rises with ``k`` towards log p(x) (k = 1 is the ELBO's one-sample
        estimate). Inputs and samples go in chunks, so k = 1000 fits in memory. ``seed``:
        as ``elbo``'s."""
        k = params.integer("k", k, low=1)
        return self._per_row_batch(x, "log_likelihood", k, generator, seed)

    def _per_row_batch(self, x, kind: str, n: int, generator, seed, fixed=None) -> torch.Tensor:
        """``kind``'s estimate from ``n`` draws per row (``fixed``'s, or drawn from ``seed``
        or ``generator``), over batches of rows and chunks of draws, in eval mode."""
        self.check_input(x)
        self._check_range(x)
        if generator is not None and (
            seed is not None or not isinstance(generator, torch.Generator)
        ):
            raise ConfigError(f"generator: a torch.Generator, without a seed; got {generator!r}")
        if fixed is None and seed is not None:  # the same draws whatever score_draws is
            seed = params.integer("seed", seed, low=0, high=2**63 - 1)
            fixed = fixed_normal_draws(n, self.latent_dim, seed).to(self.fixed_draws)
        out = []
        with eval_mode(self):
            for i in range(0, len(x), _ROW_BATCH):
                xb = x[i : i + _ROW_BATCH]
                mean, logvar = self.posterior(xb)
                x_flat = flatten(xb)
                sizes = list(sample_chunks(n, x_flat.numel()))
                if fixed is None:
                    draws = (reparameterised_draws(mean, logvar, c, generator)[1] for c in sizes)
                else:
                    draws = fixed[:n].to(mean.dtype).split(sizes)
                out.append(self._estimate(kind, x_flat, mean, logvar, draws))
        return torch.cat(out).to(x.dtype) if out else x.new_zeros(0)

    def _estimate(self, kind: str, x_flat, mean, logvar, draws) -> torch.Tensor:
        """The ELBO or the importance-weighted log-likelihood per row, float64, from
        standard-normal ``draws``: chunks of ``(n, B or 1, latent_dim)``."""
        log_px = lambda z: self._log_px(x_flat, z.reshape(-1, self.latent_dim))  # noqa: E731
        return gaussian_latent_estimate(kind, log_px, mean, logvar, draws)

    # -- generation and the hooks of aecore eval / demo ---------------------------------
    @torch.no_grad()
    def sample(
        self, n: int, *, mean: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` draws from the model: z ~ N(0, I), then the decoder's mean (``mean=True``,
        the usual picture) or a draw x ~ p(x|z) (``mean=False``)."""
        n = params.integer("n", n, low=1)
        with eval_mode(self):
            # new_empty: the weights' device and dtype (a float64 model's too)
            z = self.encoder_head.weight.new_empty(n, self.latent_dim).normal_(generator=generator)
            loc, std = self._decoder_output(z)
            if self.decoder == "bernoulli":
                probs = torch.sigmoid(loc)
                x = probs if mean else torch.bernoulli(probs, generator=generator)
            elif mean:
                x = loc
            else:
                scale = std if std is not None else self.decoder_std
                x = loc + scale * loc.new_empty(loc.shape).normal_(generator=generator)
            return x.reshape(n, *self.input_shape)

    def evaluation_metrics(self, x_test: torch.Tensor, prepared) -> dict[str, float | int]:
        """Mean test ELBO (100 samples per input) and k = 1000 importance-weighted
        log-likelihood, nats per input, seeded so reruns agree. The k = 1000 estimate
        costs 1000 decoder passes per input, so it uses at most ``EVAL_LL_ROWS`` rows."""
        x = x_test.float()
        gen = torch.Generator(device=x.device).manual_seed(0)
        x_ll = x[:EVAL_LL_ROWS]
        return {
            "test_elbo": float(self.elbo(x, samples=100, generator=gen).double().mean()),
            "test_log_likelihood_k1000": float(
                self.log_likelihood(x_ll, k=1000, generator=gen).double().mean()
            ),
            "test_log_likelihood_rows": len(x_ll),
        }

    def demo_figures(self, prepared, out_dir) -> list[tuple[str, object]]:
        gen = torch.Generator().manual_seed(0)
        samples = self.sample(36, generator=gen).numpy()
        rows = [("samples", samples[i : i + 12]) for i in range(0, 36, 12)]
        traversal = (
            "latent traversal: each row moves one code unit from -2.5 to 2.5 (others at "
            "the posterior mean of a test input); units sorted by their mean KL"
        )
        return [
            (
                "samples: decoder means for z ~ N(0, I)",
                plots.image_rows(rows, out_dir / "samples.png"),
            ),
            (traversal, self._traversal_figure(prepared, out_dir / "traversal.png")),
        ]

    @torch.no_grad()
    def _traversal_figure(self, prepared, path):
        test = torch.as_tensor(prepared.view("test").to_numpy()).float()
        with eval_mode(self):
            mean, logvar = self.posterior(test)
            kl_per_unit = kl_to_standard_normal(mean, logvar, per_unit=True).mean(0)
            units = torch.argsort(kl_per_unit, descending=True)[:10].tolist()
            labels = [f"z{unit} (KL {float(kl_per_unit[unit]):.2f})" for unit in units]
            decode = lambda z: self.decode(torch.from_numpy(z)).numpy()  # noqa: E731
            return plots.latent_traversal(decode, mean[0].numpy(), units, labels, path)
