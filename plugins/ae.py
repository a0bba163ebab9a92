"""``ae``: the plain undercomplete autoencoder, an MLP over flattened inputs.

The encoder and decoder are each a linear map plus a nonlinear MLP branch added to
it. A linear autoencoder's optimum is PCA's subspace, so with ``init="pca"`` the
linear paths start at PCA (fitted on the training data) and the nonlinear branches
start at zero output: training begins at PCA's reconstruction and early stopping can
only keep what improves on it.
"""

from __future__ import annotations

import torch
from torch import nn

from aecore import params
from aecore.base import Autoencoder
from aecore.config import DemoRecipe
from aecore.layers import (
    ACTIVATIONS,
    flatten,
    init_pca_path,
    mlp,
    output_and_reconstruction,
    reconstruction_from_logits,
    zero_,
)
from aecore.layers import output_activation as make_output


class PlainAutoencoder(Autoencoder):
    """MLP autoencoder for inputs of any shape (flattened to ``prod(input_shape)``)."""

    demo = DemoRecipe(data="digits", latent_dim=8, epochs=120)
    pca_start = True

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        hidden=(256,),
        activation="relu",
        output_activation="identity",
        reconstruction="mse",
        linear_path=True,
        init="pca",
        dropout=0.0,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.hidden = params.int_list("hidden", hidden)
        self.activation = params.choice("activation", activation, list(ACTIVATIONS))
        self.output_activation, self.reconstruction = output_and_reconstruction(
            output_activation, reconstruction
        )
        self.linear_path = params.flag("linear_path", linear_path)
        self.init = params.choice("init", init, ["pca", "random"])
        # a sigmoid maps PCA's solution elsewhere (a 0 pixel to 0.5): no PCA start
        self.pca_start = linear_path and self.init == "pca" and output_activation != "sigmoid"
        self.dropout = params.number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        if not self.hidden:
            params.warn_unused(type(self), "hidden=[]", activation=activation, dropout=dropout)
        if not linear_path:
            params.warn_unused(type(self), "linear_path=False", init=init)

        d, k = self.input_size, self.latent_dim
        self.encoder_mlp = self._branch([d, *self.hidden, k])
        self.decoder_mlp = self._branch([k, *reversed(self.hidden), d])
        self.encoder_linear = nn.Linear(d, k) if linear_path else None
        self.decoder_linear = nn.Linear(k, d) if linear_path else None
        self.output = make_output(self.output_activation)

    @property
    def input_range(self) -> tuple[float, float] | None:
        return None if self.output_activation == "identity" else (0.0, 1.0)

    def _branch(self, sizes: list[int]) -> nn.Sequential:
        net = mlp(sizes, self.activation)
        if self.dropout > 0:
            # dropout after each hidden activation, never on the code or the output
            layers: list[nn.Module] = []
            for layer in net:
                layers.append(layer)
                if not isinstance(layer, nn.Linear):
                    layers.append(nn.Dropout(self.dropout))
            net = nn.Sequential(*layers)
        return net

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "hidden": list(self.hidden),
            "activation": self.activation,
            "output_activation": self.output_activation,
            "reconstruction": self.reconstruction,
            "linear_path": self.linear_path,
            "init": self.init,
            "dropout": self.dropout,
        }

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """PCA initialisation of the linear paths; nonlinear branches output zero."""
        if not (self.linear_path and self.init == "pca"):
            return
        init_pca_path(self.encoder_linear, self.decoder_linear, x)
        for branch in (self.encoder_mlp, self.decoder_mlp):
            zero_([m for m in branch if isinstance(m, nn.Linear)][-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        flat = flatten(x)
        z = self.encoder_mlp(flat)
        if self.encoder_linear is not None:
            z = z + self.encoder_linear(flat)
        return z

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        out = self.decoder_mlp(z)
        if self.decoder_linear is not None:
            out = out + self.decoder_linear(z)
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(self._logits(z)).reshape(-1, *self.input_shape)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self._logits(self.encode(x))
        recon = reconstruction_from_logits(logits, flatten(x), self.reconstruction, self.output)
        return {"loss": recon, "recon": recon}
