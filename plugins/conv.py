"""``conv``: a convolutional autoencoder for ``(C, H, W)`` images of any size.

The encoder is a stack of stride-2 convolutions (one per entry of ``channels``, so its
length is the depth) followed by a linear map to a ``latent_dim`` vector; the decoder
mirrors it with a linear map and stride-2 transposed convolutions. Each transposed
convolution gets the ``output_padding`` (0 or 1 per axis) that restores the exact size
its encoder layer started from, so the output shape equals the input shape for odd,
rectangular and tiny images too (13x17, 8x8, 1x1). Every size is fixed at construction:
the forward pass has no data-dependent shapes and uses standard ops only (ONNX export).

Beside the convolutional branches runs a linear path (``linear_path``, on by default)
from the flattened image to the code and back, initialised at PCA (fitted on the
training data), while each branch's last layer starts at zero: training starts at
PCA's reconstruction and can only improve on it, at any code size.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from aecore import params
from aecore.base import Autoencoder
from aecore.config import DemoRecipe
from aecore.layers import (
    ACTIVATIONS,
    init_pca_path,
    output_and_reconstruction,
    reconstruction_from_logits,
    zero_,
)
from aecore.layers import activation as make_activation
from aecore.layers import output_activation as make_output


def downsampled_sizes(size: int, depth: int, kernel_size: int) -> list[int]:
    """Spatial sizes along one axis before and after each of ``depth`` stride-2
    convolutions with padding ``kernel_size // 2``: ``depth + 1`` values."""
    sizes = [size]
    for _ in range(depth):
        sizes.append((sizes[-1] + 2 * (kernel_size // 2) - kernel_size) // 2 + 1)
    return sizes


def upsampling_padding(target: int, size: int, kernel_size: int) -> int:
    """``output_padding`` that makes a stride-2 transposed convolution (padding
    ``kernel_size // 2``) map ``size`` back to ``target``."""
    produced = (size - 1) * 2 - 2 * (kernel_size // 2) + kernel_size
    extra = target - produced
    assert extra in (0, 1), (target, size, kernel_size)  # holds for every k >= 2
    return extra


class ConvAutoencoder(Autoencoder):
    """Strided-convolution encoder and transposed-convolution decoder around a vector code."""

    input_ranks = (3,)
    demo = DemoRecipe(data="digits:image", latent_dim=8, epochs=120, lr=2e-3)
    pca_start = True
    # models saved before the linear path existed had none
    legacy_defaults: ClassVar[dict] = {"linear_path": False}

    def __init__(
        self,
        *,
        input_shape,
        latent_dim,
        channels=(32, 64),
        kernel_size=3,
        activation="relu",
        output_activation="identity",
        reconstruction="mse",
        linear_path=True,
    ) -> None:
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.linear_path = params.flag("linear_path", linear_path)
        self.pca_start = linear_path and output_activation != "sigmoid"
        self.channels = params.int_list("channels", channels, allow_empty=False)
        self.kernel_size = params.integer("kernel_size", kernel_size, low=2)
        self.activation = params.choice("activation", activation, list(ACTIVATIONS))
        self.output_activation, self.reconstruction = output_and_reconstruction(
            output_activation, reconstruction
        )

        in_channels, height, width = self.input_shape
        k, pad, depth = self.kernel_size, self.kernel_size // 2, len(self.channels)
        heights = downsampled_sizes(height, depth, k)
        widths = downsampled_sizes(width, depth, k)
        self.feature_shape = (self.channels[-1], heights[-1], widths[-1])
        features = self.channels[-1] * heights[-1] * widths[-1]

        widths_in = [in_channels, *self.channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths_in[:-1], widths_in[1:]):
            encoder += [nn.Conv2d(c_in, c_out, k, stride=2, padding=pad), self._act()]
        self.encoder_convs = nn.Sequential(*encoder)
        self.encoder_linear = nn.Linear(features, self.latent_dim)

        self.decoder_linear = nn.Sequential(nn.Linear(self.latent_dim, features), self._act())
        decoder: list[nn.Module] = []
        for level in reversed(range(depth)):
            padding = (
                upsampling_padding(heights[level], heights[level + 1], k),
                upsampling_padding(widths[level], widths[level + 1], k),
            )
            c_in, c_out = widths_in[level + 1], widths_in[level]
            decoder.append(
                nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=pad, output_padding=padding)
            )
            if level > 0:  # no activation on the output layer's logits
                decoder.append(self._act())
        self.decoder_convs = nn.Sequential(*decoder)
        self.output = make_output(self.output_activation)
        if linear_path:
            self.encoder_pca = nn.Linear(self.input_size, self.latent_dim)
            self.decoder_pca = nn.Linear(self.latent_dim, self.input_size)

    @property
    def input_range(self) -> tuple[float, float] | None:
        return None if self.output_activation == "identity" else (0.0, 1.0)

    def _act(self) -> nn.Module:
        return make_activation(self.activation)

    def get_config(self) -> dict:
        return {
            **self.base_config(),
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "activation": self.activation,
            "output_activation": self.output_activation,
            "reconstruction": self.reconstruction,
            "linear_path": self.linear_path,
        }

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """PCA initialisation of the linear path; the branches start at zero output."""
        if self.linear_path:
            init_pca_path(self.encoder_pca, self.decoder_pca, x.flatten(1))
            zero_(self.encoder_linear)
            zero_(self.decoder_convs[-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        z = self.encoder_linear(self.encoder_convs(x).flatten(1))
        return z + self.encoder_pca(x.flatten(1)) if self.linear_path else z

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        self.check_code(z)
        features = self.decoder_linear(z).reshape(-1, *self.feature_shape)
        out = self.decoder_convs(features)
        if self.linear_path:
            out = out + self.decoder_pca(z).reshape(-1, *self.input_shape)
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(self._logits(z))

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self._logits(self.encode(x))
        recon = reconstruction_from_logits(logits, x, self.reconstruction, self.output)
        return {"loss": recon, "recon": recon}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.channels}, kernel_size={self.kernel_size}"
