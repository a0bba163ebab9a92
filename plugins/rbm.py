"""``rbm``: a restricted Boltzmann machine trained by contrastive divergence.

Bernoulli–Bernoulli by default; ``visible="gaussian"`` gives unit-variance Gaussian
visible units for real-valued (standardised) data, and ``hidden="gaussian"`` linear
hidden units with unit-variance Gaussian noise (the top layer of Hinton &
Salakhutdinov's deep autoencoder). Training follows Hinton's "A Practical Guide to
Training Restricted Boltzmann Machines" (2010): CD-k or persistent CD (Tieleman 2008),
small random weights, visible biases at log(p / (1 - p)) of the data, momentum 0.5 for
the first updates then 0.9 (PCD: 0.5), L2 weight decay on the weights only, mean-field
visible reconstructions. The Gibbs sampling and CD statistics run through ``aecore.ops``
(fused kernels where built) for every combination of unit types.

The RBM updates its own parameters (``uses_optimizer = False``): the Trainer calls
``train_step`` per batch. All optimiser state (velocities, the persistent chain, the
step counter) lives in buffers, so checkpoints resume exactly. As an autoencoder,
``encode`` gives the hidden means and ``decode`` the visible means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aecore import ops, params, plots
from aecore.base import Autoencoder
from aecore.config import DemoRecipe
from aecore.errors import ConfigError, DataError, TrainingError, warn
from aecore.host_values import fill_buffer, host_value
from aecore.layers import flatten

UNITS = ("bernoulli", "gaussian")


class NonBinaryDataWarning(UserWarning):
    """A Bernoulli RBM got values strictly between 0 and 1 (used as probabilities)."""


class DataRangeWarning(UserWarning):
    """A Bernoulli RBM got values outside [0, 1] (clipped)."""


class RBM(Autoencoder):
    """Restricted Boltzmann machine with ``latent_dim`` hidden units.

    Hyperparameters: ``visible`` / ``hidden`` unit types; ``k`` Gibbs steps per update;
    ``persistent`` (PCD with ``chains`` fantasy particles); ``lr`` (default 0.1 for
    Bernoulli–Bernoulli, 0.01 when a layer is Gaussian: the guide advises a rate one
    or two orders of magnitude smaller for them);
    ``momentum`` reached after ``momentum_warmup`` updates at ``initial_momentum``
    (``"auto"``: 0.9, the guide's, for CD; 0.5 for PCD, whose chains cannot follow larger
    steps);
    ``weight_decay`` (L2 on the weights); ``sample_visible`` (sample the reconstructions
    instead of using their means); ``strict`` (non-binary data for Bernoulli visible
    units is an error instead of a warning); ``probabilities`` (values in [0, 1] are
    meant as the probabilities of the visible units, e.g. grey pixels: no warning).
    """

    uses_optimizer = False
    demo = DemoRecipe(
        data="digits",
        latent_dim=32,
        epochs=30,
        batch_size=32,
        hparams={"lr": 0.05, "persistent": True, "chains": 100, "probabilities": True},
    )

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        visible="bernoulli",
        hidden="bernoulli",
        k=1,
        persistent=False,
        chains=64,
        lr=None,
        momentum="auto",
        initial_momentum=0.5,
        momentum_warmup=100,
        weight_decay=2e-4,
        sample_visible=False,
        strict=False,
        probabilities=False,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.visible = params.choice("visible", visible, UNITS)
        self.hidden = params.choice("hidden", hidden, UNITS)
        if self.visible == "gaussian" and self.hidden == "gaussian":
            raise ConfigError(
                "visible='gaussian' with hidden='gaussian' has no normalisable distribution; "
                "make at least one side 'bernoulli'"
            )
        # Gibbs steps per update, within what the ops run
        self.k = params.integer("k", k, low=1, high=ops.MAX_GIBBS_STEPS)
        self.persistent = params.flag("persistent", persistent)
        self.chains = params.integer("chains", chains, low=1)
        if lr is None:
            lr = 0.1 if self.visible == self.hidden == "bernoulli" else 0.01
        self.lr = params.number("lr", lr, low=0.0, low_open=True)
        # PCD's chains follow the weights only under small steps (at 0.9 they fell behind)
        auto = 0.5 if self.persistent else 0.9
        self.momentum = params.number_or_auto("momentum", momentum, auto, low=0.0, high=1.0,
                                              high_open=True)  # fmt: skip
        self.initial_momentum = params.number(
            "initial_momentum", initial_momentum, low=0.0, high=1.0, high_open=True
        )
        self.momentum_warmup = params.integer("momentum_warmup", momentum_warmup, low=0)
        self.weight_decay = params.number("weight_decay", weight_decay, low=0.0)
        self.sample_visible = params.flag("sample_visible", sample_visible)
        self.strict = params.flag("strict", strict)
        params.flag("probabilities", probabilities)
        if strict and probabilities:
            raise ConfigError(
                "strict=True makes non-binary data an error and probabilities=True accepts "
                "it as probabilities; choose one"
            )
        self.probabilities = probabilities
        if not persistent:
            params.warn_unused(type(self), "persistent=False (CD)", chains=chains)
        if self.visible == "gaussian":  # both are about binary data for Bernoulli units
            params.warn_unused(
                type(self), "visible='gaussian'", strict=strict, probabilities=probabilities
            )

        n_visible, n_hidden = self.input_size, self.latent_dim
        # W is (visible, hidden), the layout of aecore.ops and of Hinton's code
        self.W = nn.Parameter(0.01 * torch.randn(n_visible, n_hidden), requires_grad=False)
        self.b_v = nn.Parameter(torch.zeros(n_visible), requires_grad=False)
        self.b_h = nn.Parameter(torch.zeros(n_hidden), requires_grad=False)
        # optimiser state as buffers: saved in checkpoints, so resume is exact
        self.register_buffer("velocity_W", torch.zeros(n_visible, n_hidden))
        self.register_buffer("velocity_b_v", torch.zeros(n_visible))
        self.register_buffer("velocity_b_h", torch.zeros(n_hidden))
        self.register_buffer("chain", torch.zeros(self.chains if persistent else 0, n_hidden))
        self.register_buffer("chain_started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self._warned: set[type] = set()

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "visible": self.visible,
            "hidden": self.hidden,
            "k": self.k,
            "persistent": self.persistent,
            "chains": self.chains,
            "lr": self.lr,
            "momentum": self.momentum,
            "initial_momentum": self.initial_momentum,
            "momentum_warmup": self.momentum_warmup,
            "weight_decay": self.weight_decay,
            "sample_visible": self.sample_visible,
            "strict": self.strict,
            "probabilities": self.probabilities,
        }

    # settings of Bernoulli visible units keep them
    _UNIT_CHOICES = frozenset({"visible", "probabilities", "strict"})

    @classmethod
    def real_valued_hparams(cls, given: dict) -> dict:
        # one-class breast cancer / wine: mean ROC-AUC 0.931 / 0.983 against 0.890 / 0.750
        # from Bernoulli units on min-max scaled, clipped rows; Gaussian hidden units have
        # no normalisable joint with Gaussian visible ones
        if given.keys() & cls._UNIT_CHOICES or given.get("hidden") == "gaussian":
            return {}
        return {"visible": "gaussian"}

    @classmethod
    def rescaled_hparams(cls, given: dict) -> dict:
        # grey values handed to (or made by) the estimator are meant so: no warning about them
        return {} if given.keys() & cls._UNIT_CHOICES else {"probabilities": True}

    @property
    def input_range(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.visible == "bernoulli" else None

    # -- the autoencoder view ----------------------------------------------------------
    def hidden_mean(self, v: torch.Tensor) -> torch.Tensor:
        """E[h | v] for flat visible rows ``v`` (B, V)."""
        pre = v @ self.W + self.b_h
        return pre if self.hidden == "gaussian" else torch.sigmoid(pre)

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h] as flat rows (B, V)."""
        pre = h @ self.W.t() + self.b_v
        return pre if self.visible == "gaussian" else torch.sigmoid(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.hidden_mean(flatten(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        return self.visible_mean(z).reshape(-1, *self.input_shape)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean-field reconstruction error per element (what ``model(x)`` reconstructs);
        the RBM is not trained on it, but it is what validation and early stopping see."""
        recon = F.mse_loss(self(x), x)
        return {"loss": recon, "recon": recon}

    # -- energy-based quantities -------------------------------------------------------
    # the free energy (-log p(v) up to a constant) detects anomalies better than the
    # reconstruction error: mean ROC-AUC 0.972 against 0.962 on `aecore bench anomaly`
    score_kinds = ("reconstruction", "free_energy")
    default_score_kind = "free_energy"
    exportable_score_kinds = score_kinds

    def anomaly_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return self.free_energy(x)

    def free_energy(self, x: torch.Tensor) -> torch.Tensor:
        """F(v) with p(v) ∝ exp(-F(v)), per sample (B,); the hidden units summed out."""
        self.check_input(x)
        v = flatten(x)
        pre = v @ self.W + self.b_h
        if self.hidden == "gaussian":
            hidden_term = 0.5 * pre.pow(2).sum(1)
        else:
            hidden_term = F.softplus(pre).sum(1)
        if self.visible == "gaussian":
            visible_term = 0.5 * (v - self.b_v).pow(2).sum(1)
        else:
            visible_term = -(v @ self.b_v)
        return visible_term - hidden_term

    @torch.no_grad()
    def pseudo_likelihood(self, x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """Stochastic pseudo-log-likelihood per sample (B,), the estimator of
        scikit-learn's ``BernoulliRBM.score_samples``: flip one randomly chosen unit per
        sample (v -> 1 - v) and return ``V * log sigmoid(F(v_flipped) - F(v))``."""
        if self.visible != "bernoulli":
            raise ConfigError(
                "pseudo_likelihood flips binary units: it needs visible='bernoulli'; "
                f"this RBM has visible={self.visible!r}"
            )
        self.check_input(x)
        v = flatten(x)
        lo, hi = (float(t) for t in torch.aminmax(v)) if v.numel() else (0.0, 1.0)
        if lo < -1 or hi > 2:  # other units (pixel counts): no states of a binary unit
            raise DataError(f"pseudo_likelihood needs visible values in [0, 1]; got values "
                            f"in [{lo:.4g}, {hi:.4g}]: normalise them as for training")  # fmt: skip
        v = self._visible_data(x) if lo < 0 or hi > 1 else v  # new rows past the range: clipped
        gen = torch.Generator().manual_seed(params.integer("seed", seed, low=0))
        cols = torch.randint(0, v.shape[1], (v.shape[0],), generator=gen).to(v.device)
        rows = torch.arange(v.shape[0], device=v.device)
        flipped = v.clone()
        flipped[rows, cols] = 1 - flipped[rows, cols]
        fe = self.free_energy(v.reshape(x.shape))
        fe_flipped = self.free_energy(flipped.reshape(x.shape))
        return v.shape[1] * F.logsigmoid(fe_flipped - fe)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 1000, *, seed: int | None = None) -> torch.Tensor:
        """``n`` visible means after ``steps`` Gibbs steps from random visible states."""
        n = params.integer("n", n, low=1)
        steps = params.integer("steps", steps, low=1)
        gen = torch.Generator(self.W.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        shape = (n, self.input_size)
        like = {"device": self.W.device, "dtype": self.W.dtype}  # a float64 model's too
        if self.visible == "gaussian":
            v = torch.randn(shape, generator=gen, **like) + self.b_v
        else:
            v = torch.bernoulli(torch.full(shape, 0.5, **like), generator=gen)
        out = ops.gibbs_chain(
            v, self.W, self.b_v, self.b_h, steps,
            visible=self.visible, hidden=self.hidden, sample_visible=True, generator=gen,
        )  # fmt: skip
        return out.v_mean.reshape(n, *self.input_shape)

    # -- training ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Visible biases from the data: log(p / (1 - p)) for Bernoulli units (so the
        hidden units start by explaining what the biases cannot), the mean for Gaussian."""
        v = self._visible_data(x)
        if self.visible == "gaussian":
            self.b_v.copy_(v.mean(0))
        else:
            p = v.mean(0).clamp(1e-3, 1 - 1e-3)
            self.b_v.copy_(torch.log(p / (1 - p)))

    @torch.no_grad()
    def check_training_data(self, chunks) -> bool:
        """The trainer's hook: ``_visible_data``'s checks once over the whole data (an
        iterable of row chunks). True when every row passes as it is, so that the
        trainer's steps may skip them (``train_step(x, checked=True)``)."""
        if self.visible != "bernoulli":
            return True  # Gaussian units take any real values
        lo, hi, binary = math.inf, -math.inf, True
        for chunk in chunks:
            v = flatten(chunk).to(self.W.dtype)
            if v.numel() == 0:
                continue
            a, b = torch.aminmax(v)
            lo, hi = min(lo, float(a)), max(hi, float(b))
            if binary and not self.probabilities:
                binary = torch.equal(v, v.round())
        if lo < 0 or hi > 1:
            return False  # each batch is clipped, with the warning, as it comes
        if not binary and not self.probabilities:
            self._complain(*self._NON_BINARY)
        return True

    @torch.no_grad()
    def train_step(
        self, x: torch.Tensor, *, momentum: float | None = None, checked: bool = False
    ) -> dict:
        """One CD-k / PCD-k update on batch ``x``; ``momentum`` overrides the schedule;
        ``checked``: ``x`` comes from data that ``check_training_data`` passed.

        Returns ``{"loss": reconstruction error per element}``: for CD, of the
        reconstruction the chain made from the data (Hinton's monitor); for PCD, whose
        chain does not reconstruct the batch, of the mean-field reconstruction."""
        v = flatten(x).to(self.W.dtype) if checked else self._visible_data(x)
        chain = None
        units = {"visible": self.visible, "hidden": self.hidden}
        if self.persistent:
            if not host_value(self, "chain_started", bool):
                # start the fantasy particles at the first batch's hidden states
                start = ops.gibbs_chain(v, self.W, self.b_v, self.b_h, **units).h0
                self.chain.copy_(start[torch.arange(self.chains) % len(v)])
                fill_buffer(self, "chain_started", True)
            chain = self.chain
        if momentum is None:
            warm = self.momentum_warmup and host_value(self, "updates", int) < self.momentum_warmup
            momentum = self.initial_momentum if warm else self.momentum
        else:  # as the constructor checks its momenta: 1 or more diverges
            momentum = params.number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        # the CD statistics, then velocity = momentum * velocity + lr * (gradient -
        # weight_decay * W); W += velocity, and the PCD chain advanced: one call, and
        # nothing changes if a statistic is not finite
        recon, applied = ops.cd_update_own_(
            v, self.W, self.b_v, self.b_h,
            [self.velocity_W, self.velocity_b_v, self.velocity_b_h],
            self.lr, momentum, self.weight_decay, self.k,
            chain=chain, sample_visible=self.sample_visible, **units,
        )  # fmt: skip
        if not bool(applied):
            raise TrainingError(
                f"non-finite CD statistics after {int(self.updates)} updates; lower lr "
                f"(now {self.lr:g}); Gaussian units need a rate 10-100x smaller than binary ones"
            )
        fill_buffer(self, "updates", host_value(self, "updates", int) + 1)  # no device wait
        # CD: the chain's reconstruction; PCD: the mean-field one (see ops.CDStats)
        return {"loss": recon / v.shape[1]}

    def _visible_data(self, x: torch.Tensor) -> torch.Tensor:
        """Flat float rows, checked against the visible unit type (see ``strict``)."""
        self.check_input(x)
        v = flatten(x).to(self.W.dtype)
        if self.visible != "bernoulli" or v.numel() == 0:
            return v
        lo, hi = (float(t) for t in torch.aminmax(v))
        if lo < 0 or hi > 1:
            self._complain(
                DataRangeWarning,
                f"RBM(visible='bernoulli') needs data in [0, 1]; got values in "
                f"[{lo:.4g}, {hi:.4g}]",
                "clipping them to [0, 1]",
                "normalise to [0, 1] (--normalize minmax) or use visible='gaussian' for "
                "real-valued data",
            )
            return v.clamp(0, 1)
        # in [0, 1], a value is 0 or 1 exactly when rounding leaves it unchanged
        if not self.probabilities and not torch.equal(v, v.round()):
            self._complain(*self._NON_BINARY)
        return v

    _NON_BINARY = (
        NonBinaryDataWarning,
        "RBM(visible='bernoulli') got non-binary values in [0, 1]",
        "using them as the probabilities of the visible units being on (as "
        "scikit-learn's BernoulliRBM does)",
        "binarise the data (or pass probabilities=True if they are meant so)",
    )

    def _complain(self, category: type, problem: str, action: str, fix: str) -> None:
        if self.strict:
            raise DataError(f"{problem}; {fix} (strict=True makes this an error)")
        if category not in self._warned:  # once per model: training sees every batch
            self._warned.add(category)
            warn(f"{problem}: {action}; {fix}, or pass strict=True to make this an error", category)

    # -- demo --------------------------------------------------------------------------
    def demo_figures(self, prepared, out_dir) -> list[tuple[str, object]]:
        samples = self.sample(12, steps=1000, seed=0).cpu().numpy()
        # fmt: off
        figures = [("samples: visible means after a 1000-step Gibbs chain from random states",
                    plots.image_rows([("samples", samples)], out_dir / "samples.png"))]
        filters = self.W.t().cpu().numpy().reshape(-1, *self.input_shape)  # images stay so
        if plots.as_images(filters[:1]) is not None:
            figures.append(("filters: each hidden unit's weights to the visible units",
                            plots.filter_grid(filters, out_dir / "filters.png")))
        # fmt: on
        return figures

    def extra_repr(self) -> str:
        mode = f"PCD-{self.k}" if self.persistent else f"CD-{self.k}"
        return f"{super().extra_repr()}, {self.visible}-{self.hidden}, {mode}, lr={self.lr:g}"
