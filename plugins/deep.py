"""``deep``: Hinton & Salakhutdinov's (2006) deep autoencoder, pretrained as a stack
of RBMs, unrolled, then fine-tuned by backpropagation.

Layer-wise pretraining trains one ``rbm`` per layer (plugins/rbm.py) on the hidden
probabilities of the layer below; the top RBM has linear hidden units with Gaussian
noise, so the code is real-valued. The stack is unrolled into an encoder (RBM weights,
hidden biases) and a decoder (transposed weights, visible biases), which the Trainer
then fine-tunes on reconstruction error through ``loss``. ``pretrain=False`` skips the
RBMs and fine-tunes from a random start, so the benefit is measurable.

Where fine-tuning starts (``start``):

* ``"pca"`` (the default): beside the unrolled net runs a linear path, input -> code ->
  output, initialised at PCA (fitted on the training data); the net's code layer and
  output layer start at zero, its hidden layers at the pretrained RBMs. Fine-tuning
  begins at PCA's reconstruction (clipped to [0, 1] for Bernoulli inputs, never
  further from them) and can only improve on it, at any code size and budget.
* ``"pretrained"``: the unrolled RBMs as they are (logistic outputs for Bernoulli
  inputs), with ``linear_path`` adding zero-initialised linear maps to the logits:
  Hinton & Salakhutdinov's start, the stronger one for small codes given a long
  fine-tuning (the README's recipe), but worse than PCA where sigmoid layers are slow
  to become linear (large codes, short budgets).

``aecore eval`` on a saved ``deep`` model adds Hinton's comparison: the same net
(same config, ``pretrain=False``) trained there and then on the same train/val split,
with the training config the model itself was fine-tuned with (``model.json``'s
``training``), next to PCA at the same code size; ``aecore train`` does not run it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from aecore import ops, params, plots
from aecore.base import Autoencoder, eval_mode
from aecore.config import DemoRecipe
from aecore.errors import ConfigError
from aecore.io.model_folder import training_config
from aecore.layers import (
    flatten,
    init_pca_path,
    pca_basis,
    reconstruction_from_logits,
    zero_,
)
from aecore.training import Trainer
from aecore_plugins.rbm import RBM

#: where fine-tuning starts (see the module docstring)
STARTS = ("pca", "pretrained")
#: epochs at the RBMs' initial momentum before it rises (Hinton's practical guide: ~5)
MOMENTUM_WARMUP_EPOCHS = 5
#: pretraining reports its progress every this many epochs of each RBM
LOG_EVERY = 10


class DeepAutoencoder(Autoencoder):
    """Sigmoid MLP autoencoder ``input -> hidden... -> latent_dim -> ...hidden -> input``
    with a linear code layer, pretrained layer-wise as RBMs (``pretrain=True``).

    ``start`` (``"pca"`` or ``"pretrained"``, see the module docstring); ``linear_path``
    (with ``start="pretrained"``: off = the paper's net exactly; ``start="pca"`` needs it).

    Hyperparameters: ``hidden`` encoder widths (Hinton's MNIST net: [1000, 500, 250]
    with latent_dim 30); ``visible`` input units (``bernoulli``: data in [0, 1], logistic
    outputs; ``gaussian``: standardised real data, linear outputs); ``reconstruction``
    (fine-tuning loss: ``mse``, what the eval table reports, or ``bce`` = the paper's
    cross-entropy); ``pretrain``; ``pretrain_epochs`` per layer; ``pretrain_lr`` for the
    binary RBMs and ``pretrain_lr_gaussian`` for those with Gaussian units (the top one,
    and the bottom one when ``visible='gaussian'``); ``pretrain_k`` (CD-k);
    ``pretrain_weight_decay``.
    """

    demo = DemoRecipe(
        data="digits", latent_dim=2, epochs=60, lr=3e-3,
        hparams={"hidden": [256, 128], "pretrain_epochs": 20},
    )  # fmt: skip
    # older versions kept the fine-tuning settings in this buffer (now in model.json)
    retired_state_keys = ("finetune_budget",)
    pca_start = True
    # saved before fine-tuning could start at PCA: the unrolled net
    legacy_defaults: ClassVar[dict] = {"start": "pretrained"}

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        hidden=(256, 128),
        visible="bernoulli",
        reconstruction="mse",
        start="pca",
        linear_path=True,
        pretrain=True,
        pretrain_epochs=50,
        pretrain_lr=0.1,
        pretrain_lr_gaussian=0.01,
        pretrain_k=1,
        pretrain_weight_decay=2e-4,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        if isinstance(hidden, (list, tuple)) and len(hidden) == 0:
            raise ConfigError("deep needs at least one hidden layer between the input and the "
                              "code, e.g. hidden=[1000, 500, 250]; got hidden=[] (use 'ae' or "
                              "'rbm' for a shallow model)")  # fmt: skip
        self.hidden = params.int_list("hidden", hidden, allow_empty=False)
        self.visible = params.choice("visible", visible, ["bernoulli", "gaussian"])
        self.reconstruction = params.choice("reconstruction", reconstruction, ["bce", "mse"])
        if self.reconstruction == "bce" and self.visible != "bernoulli":
            raise ConfigError(
                "reconstruction='bce' needs visible='bernoulli' (data in [0, 1]); "
                "use reconstruction='mse' with visible='gaussian'"
            )
        self.linear_path = params.flag("linear_path", linear_path)
        self.start = params.choice("start", start, STARTS)
        self.pca_start = self.start == "pca"
        if self.start == "pca" and not linear_path:
            raise ConfigError(
                "start='pca' begins on the linear path: it needs linear_path=true "
                "(linear_path=false, the paper's net, goes with start='pretrained')"
            )
        if self.start == "pca" and self.reconstruction == "bce":
            raise ConfigError(
                "reconstruction='bce' is the cross-entropy of the pretrained net's logistic "
                "outputs: it goes with start='pretrained' (start='pca' fine-tunes on mse)"
            )
        self.use_pretraining = params.flag("pretrain", pretrain)  # self.pretrain: the hook
        self.pretrain_epochs = params.integer("pretrain_epochs", pretrain_epochs, low=1)
        self.pretrain_lr = params.number("pretrain_lr", pretrain_lr, low=0.0, low_open=True)
        self.pretrain_lr_gaussian = params.number(
            "pretrain_lr_gaussian", pretrain_lr_gaussian, low=0.0, low_open=True
        )
        self.pretrain_k = params.integer("pretrain_k", pretrain_k, low=1, high=ops.MAX_GIBBS_STEPS)
        self.pretrain_weight_decay = params.number(
            "pretrain_weight_decay", pretrain_weight_decay, low=0.0
        )
        if not self.use_pretraining:  # every pretrain_* setting is then unused
            unused = {k: v for k, v in locals().items() if k.startswith("pretrain_")}
            params.warn_unused(type(self), "pretrain=False", **unused)
        elif len(self.hidden) == 1 and self.visible == "gaussian":  # both RBMs Gaussian
            why = "visible='gaussian' with one hidden layer gives every RBM Gaussian units"
            params.warn_unused(type(self), why, pretrain_lr=pretrain_lr)

        sizes = self.layer_sizes
        n = len(sizes) - 1
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        # decoder[j] mirrors encoder[n - 1 - j]
        self.decoder = nn.ModuleList(nn.Linear(sizes[i + 1], sizes[i]) for i in reversed(range(n)))
        pca = self.start == "pca"
        if linear_path:
            # start='pretrained': zero at the start, so the pretrained net is unrolled
            # exactly; fine-tuning can then fit the near-linear part of the map (large
            # codes) through them. start='pca': PCA's projection (init_from_data)
            self.encoder_linear = nn.Linear(sizes[0], sizes[-1], bias=pca)
            self.decoder_linear = nn.Linear(sizes[-1], sizes[0], bias=pca)
            if not pca:
                nn.init.zeros_(self.encoder_linear.weight)
                nn.init.zeros_(self.decoder_linear.weight)
        else:
            self.encoder_linear = self.decoder_linear = None

    @classmethod
    def real_valued_hparams(cls, given: dict) -> dict:
        # one-class wine / breast cancer: mean ROC-AUC 0.931 / 0.902 against 0.874 / 0.882
        # from Bernoulli visible units on min-max scaled, clipped rows
        keep = "visible" in given or given.get("reconstruction") == "bce"
        return {} if keep else {"visible": "gaussian"}

    @property
    def input_range(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.visible == "bernoulli" else None

    @property
    def layer_sizes(self) -> list[int]:
        """Widths from the input to the code, e.g. [64, 256, 128, 8]."""
        return [self.input_size, *self.hidden, self.latent_dim]

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "hidden": list(self.hidden),
            "visible": self.visible,
            "reconstruction": self.reconstruction,
            "start": self.start,
            "linear_path": self.linear_path,
            "pretrain": self.use_pretraining,
            "pretrain_epochs": self.pretrain_epochs,
            "pretrain_lr": self.pretrain_lr,
            "pretrain_lr_gaussian": self.pretrain_lr_gaussian,
            "pretrain_k": self.pretrain_k,
            "pretrain_weight_decay": self.pretrain_weight_decay,
        }

    # -- the network -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        flat = h = flatten(x)
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if i < len(self.encoder) - 1:  # the code layer is linear
                h = torch.sigmoid(h)
        return h if self.encoder_linear is None else h + self.encoder_linear(flat)

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        h = z
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < len(self.decoder) - 1:
                h = torch.sigmoid(h)
        return h if self.decoder_linear is None else h + self.decoder_linear(z)

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        if self.visible == "gaussian":
            return logits
        if self.start == "pca":  # a clipped linear output: PCA's, never further from [0, 1] data
            return logits.clamp(0.0, 1.0)
        return torch.sigmoid(logits)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """start='pca': the linear path at PCA, the net's code and output layers at zero
        (its hidden layers keep what pretraining gives them, see ``unroll``)."""
        if self.start == "pca":
            init_pca_path(self.encoder_linear, self.decoder_linear, flatten(x))
            self._zero_net_ends()

    def _zero_net_ends(self) -> None:
        zero_(self.encoder[-1])
        zero_(self.decoder[-1])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._output(self._logits(z)).reshape(-1, *self.input_shape)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self._logits(self.encode(x))
        recon = reconstruction_from_logits(logits, flatten(x), self.reconstruction, self._output)
        return {"loss": recon, "recon": recon}

    # -- pretraining -------------------------------------------------------------------
    def layer_rbms(self) -> list[RBM]:
        """Fresh RBMs for the layers, bottom to top, configured as the paper's."""
        sizes = self.layer_sizes
        rbms = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            top, bottom = i == len(sizes) - 2, i == 0
            visible = self.visible if bottom else "bernoulli"
            hidden = "gaussian" if top else "bernoulli"
            gaussian = "gaussian" in (visible, hidden)
            rbms.append(
                RBM(
                    input_shape=(n_in,),
                    latent_dim=n_out,
                    visible=visible,
                    hidden=hidden,
                    k=self.pretrain_k,
                    lr=self.pretrain_lr_gaussian if gaussian else self.pretrain_lr,
                    weight_decay=self.pretrain_weight_decay,
                    # grey pixels and the layers' hidden means below are probabilities
                    probabilities=visible == "bernoulli",
                )
            )
        return rbms

    def pretrain(self, batches, log) -> None:
        """The Trainer's pretraining hook: train the RBM stack layer by layer on
        ``batches()`` (an iterator over training batches, reshuffled at every call) and
        unroll it into the net; ``log(message)`` reports the progress of each layer."""
        if not self.use_pretraining or getattr(self, "rbms_given", False):
            return
        device = self.encoder[0].weight.device
        rbms = [rbm.to(device) for rbm in self.layer_rbms()]
        for i, rbm in enumerate(rbms):
            below = rbms[:i]
            first = [v for v, _ in zip(_inputs(batches, below, device), range(8))]
            rbm.init_from_data(torch.cat(first))
            for epoch in range(self.pretrain_epochs):
                warm = epoch < MOMENTUM_WARMUP_EPOCHS
                momentum = rbm.initial_momentum if warm else rbm.momentum
                total, count = 0.0, 0
                for v in _inputs(batches, below, device):
                    total += float(rbm.train_step(v, momentum=momentum)["loss"]) * len(v)
                    count += len(v)
                if (epoch + 1) % LOG_EVERY == 0 and epoch + 1 < self.pretrain_epochs:
                    log(
                        f"pretraining RBM {i + 1}/{len(rbms)}: epoch {epoch + 1}/"
                        f"{self.pretrain_epochs}, reconstruction error {total / max(count, 1):.5g}"
                    )
            log(
                f"pretrained RBM {i + 1}/{len(rbms)} ({rbm.input_size}->{rbm.latent_dim}, "
                f"{rbm.visible}-{rbm.hidden}): reconstruction error "
                f"{total / max(count, 1):.5g} after {self.pretrain_epochs} epochs"
            )
        self.unroll(rbms)

    @torch.no_grad()
    def unroll(self, rbms: list[RBM]) -> None:
        """Copy a stack of trained RBMs (bottom first) into the encoder and, transposed,
        into the decoder. Their widths must chain: input -> hidden... -> latent_dim."""
        sizes = self.layer_sizes
        if len(rbms) != len(sizes) - 1:
            raise ConfigError(
                f"this net has {len(sizes) - 1} layers ({'-'.join(map(str, sizes))}); got "
                f"{len(rbms)} RBMs"
            )
        for i, rbm in enumerate(rbms):
            if (rbm.input_size, rbm.latent_dim) != (sizes[i], sizes[i + 1]):
                raise ConfigError(
                    f"RBM {i + 1} is {rbm.input_size}->{rbm.latent_dim} but layer {i + 1} of "
                    f"this net is {sizes[i]}->{sizes[i + 1]}: the RBM widths must chain "
                    f"{'-'.join(map(str, sizes))}"
                )
        n = len(rbms)
        for i, rbm in enumerate(rbms):
            self.encoder[i].weight.copy_(rbm.W.t())
            self.encoder[i].bias.copy_(rbm.b_h)
            self.decoder[n - 1 - i].weight.copy_(rbm.W)
            self.decoder[n - 1 - i].bias.copy_(rbm.b_v)
        if self.start == "pca":  # the net joins the PCA path from zero
            self._zero_net_ends()

    @classmethod
    def from_rbms(cls, rbms: list[RBM], **hparams) -> DeepAutoencoder:
        """A deep autoencoder unrolled from RBMs trained elsewhere (bottom first)."""
        if not rbms:
            raise ConfigError("from_rbms needs at least one RBM; got none")
        for i, (lower, upper) in enumerate(zip(rbms[:-1], rbms[1:])):
            if lower.latent_dim != upper.input_size:
                raise ConfigError(
                    f"RBM widths do not chain: RBM {i + 1} has {lower.latent_dim} hidden "
                    f"units but RBM {i + 2} has {upper.input_size} visible units"
                )
        if len(rbms) < 2:
            raise ConfigError("a deep autoencoder needs two RBMs or more (hidden and code)")
        model = cls(
            input_shape=rbms[0].input_shape,
            latent_dim=rbms[-1].latent_dim,
            hidden=[r.latent_dim for r in rbms[:-1]],
            # the RBMs as they are, their visible units included, unless asked otherwise
            **{"start": "pretrained", "visible": rbms[0].visible, **hparams},
        )
        model.unroll(rbms)
        # given weights: fit trains on from them, and never pretrains; a PCA start still
        # takes its linear path from the data (init_from_data keeps the unrolled layers)
        model.data_initialised, model.rbms_given = model.start != "pca", True
        return model

    # -- evaluation: Hinton's table ----------------------------------------------------
    def evaluation_metrics(self, x_test: torch.Tensor, prepared) -> dict:
        """``aecore eval``'s extra row: the same net without pretraining, trained on the
        same train/val split with this model's training config, its test MSE.

        Only for a saved model (``aecore eval``, which sets ``metadata``): the ``aecore
        train`` run that just fine-tuned this net does not pay for a second training."""
        if getattr(self, "metadata", None) is None or not self.use_pretraining:
            return {}
        config = training_config(self.metadata).replace(device="cpu").for_model(self)
        torch.manual_seed(config.seed)
        same_net = {k: v for k, v in self.get_config().items() if not k.startswith("pretrain_")}
        baseline = type(self)(**{**same_net, "pretrain": False})
        baseline.normalization = self.normalization
        with torch.enable_grad():  # aecore.pipeline.evaluate runs under no_grad
            val = prepared.view("val")  # none with --val-fraction 0
            Trainer(config, progress=False).fit(baseline, prepared.view("train"), val or None)
        with torch.no_grad(), eval_mode(baseline):
            mse = float((baseline(x_test) - x_test).pow(2).mean())
        label = (
            f"same net without pretraining (same training: up to {config.epochs} epochs, "
            f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g})"
        )
        return {"baselines": {label: mse}}

    # -- demo --------------------------------------------------------------------------
    def demo_figures(self, prepared, out_dir) -> list[tuple[str, object]]:
        figures = []
        if self.latent_dim == 2:
            mean, comps = pca_basis(torch.as_tensor(prepared.view("train").to_numpy()), 2)
            test = prepared.view("test").to_numpy()
            codes = (test.reshape(len(test), -1) - mean.numpy()) @ comps.numpy().T
            figures.append(
                (
                    "PCA's 2-D codes of the test split, for comparison with the deep "
                    "autoencoder's (Hinton & Salakhutdinov 2006, Fig. 3)",
                    plots.latent_map(
                        codes, prepared.labels("test"), out_dir / "pca_codes.png", "PCA"
                    ),
                )
            )
        first = self.encoder[0].weight.detach().cpu().numpy().reshape(-1, *self.input_shape)
        if plots.as_images(first[:1]) is not None:
            figures.append(
                (
                    "first-layer filters (encoder weights of each first hidden unit)",
                    plots.filter_grid(first[:100], out_dir / "filters.png"),
                )
            )
        return figures


def _inputs(batches, below: list[RBM], device):
    """Training batches as the input of the next RBM: flat rows pushed through the RBMs
    already trained (their hidden probabilities, as in the paper)."""
    for x in batches():
        v = flatten(x.to(device).float())
        for rbm in below:
            v = rbm.hidden_mean(v)
        yield v
