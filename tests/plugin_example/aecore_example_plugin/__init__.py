"""The smallest useful aecore plugin: a one-layer linear autoencoder."""

import torch.nn.functional as F
from torch import nn

import aecore
from aecore import params


class TinyAutoencoder(aecore.Autoencoder):
    def __init__(self, *, input_shape, latent_dim, bias=True):
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.bias = params.flag("bias", bias)
        self.enc = nn.Linear(self.input_size, latent_dim, bias=bias)
        self.dec = nn.Linear(latent_dim, self.input_size, bias=bias)

    def get_config(self):
        return {**self.base_config(), "bias": self.bias}

    def encode(self, x):
        self.check_input(x)
        return self.enc(x.flatten(1))

    def decode(self, z):
        self.check_code(z)
        return self.dec(z).reshape(-1, *self.input_shape)

    def loss(self, x):
        recon = F.mse_loss(self(x), x)
        return {"loss": recon, "recon": recon}
