"""Building blocks shared by the plugins: activations, MLPs, reconstruction losses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aecore.errors import ConfigError
from aecore.params import choice

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

RECONSTRUCTIONS = ("mse", "bce")
#: a decoder's last step: unbounded, or outputs in [0, 1] by a sigmoid (which reaches 0
#: and 1 only in the limit, so it cannot start at PCA's solution) or by clipping
#: (Hardtanh, ONNX's Clip: PCA's solution clipped to [0, 1] is no worse than PCA's)
OUTPUTS = {
    "identity": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "clip": lambda: nn.Hardtanh(0.0, 1.0),
}
OUTPUT_ACTIVATIONS = tuple(OUTPUTS)


def output_and_reconstruction(output_activation: str, reconstruction: str) -> tuple[str, str]:
    """Check a decoder's output activation and reconstruction loss together: BCE needs
    outputs (and so inputs) in [0, 1]."""
    choice("output_activation", output_activation, OUTPUT_ACTIVATIONS)
    choice("reconstruction", reconstruction, RECONSTRUCTIONS)
    if reconstruction == "bce" and output_activation != "sigmoid":
        raise ConfigError(
            "reconstruction='bce' needs output_activation='sigmoid' (inputs in [0, 1]); "
            f"got output_activation={output_activation!r}"
        )
    return output_activation, reconstruction


def activation(name: str, param: str = "activation") -> nn.Module:
    return ACTIVATIONS[choice(param, name, list(ACTIVATIONS))]()


def output_activation(name: str) -> nn.Module:
    """The module of an ``output_activation`` (``OUTPUTS``)."""
    return OUTPUTS[choice("output_activation", name, OUTPUT_ACTIVATIONS)]()


def mlp(sizes: Sequence[int], act: str, *, final_activation: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def reconstruction_error(x_hat: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean reconstruction loss per element. ``bce`` takes *logits* in ``x_hat``
    (numerically stable) and needs targets in [0, 1]."""
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x_hat, x)
    raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}; got {kind!r}")


def flatten(x: torch.Tensor) -> torch.Tensor:
    # flatten(1), not reshape(B, -1): a batch of no rows has no -1 to infer
    return x.flatten(1)


def pca_basis(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top-k principal directions (k, D) of the rows of ``x``
    (flattened), in float64 on x's device; when the data has fewer than k directions
    the rest are zero (they add nothing to a projection)."""
    x = flatten(x).double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    n = min(k, vh.shape[0])
    comps[:n] = vh[:n]
    return mean, comps


@torch.no_grad()
def init_pca_path(encoder: nn.Linear, decoder: nn.Linear, x: torch.Tensor) -> None:
    """Make ``encoder`` (D -> k) give the PCA coordinates of ``x``'s rows and ``decoder``
    (k -> D) map them back: ``decoder(encoder(x))`` is PCA's reconstruction at code k.
    A linear autoencoder's optimum is PCA's subspace (Baldi & Hornik 1989), so a model
    whose nonlinear parts start at zero beside this path starts at PCA's solution."""
    mean, comps = pca_basis(x, encoder.out_features)
    mean, comps = mean.to(encoder.weight), comps.to(encoder.weight)
    encoder.weight.copy_(comps)
    encoder.bias.copy_(-comps @ mean)
    decoder.weight.copy_(comps.T)
    decoder.bias.copy_(mean)


@torch.no_grad()
def zero_(layer: nn.Module) -> None:
    """Weights and bias of ``layer`` to zero: a branch ending in it outputs zero until
    training moves it (its input still carries gradient to this layer)."""
    for p in layer.parameters():
        p.zero_()


def reconstruction_from_logits(
    logits: torch.Tensor, target: torch.Tensor, kind: str, output
) -> torch.Tensor:
    """The reconstruction loss of a decoder that produces ``logits`` before its output
    activation ``output``: ``bce`` straight on the logits (numerically stable), ``mse``
    on ``output(logits)``. ``logits`` and ``target`` have the same shape."""
    if kind == "bce":
        return reconstruction_error(logits, target, "bce")
    return reconstruction_error(output(logits), target, kind)


# -- Gaussian latents (the VAE) -----------------------------------------------------------
#: decoder outputs per chunk of importance samples (bounds the memory of an estimate)
CHUNK_ELEMENTS = 1 << 20


def kl_to_standard_normal(
    mean: torch.Tensor, logvar: torch.Tensor, per_unit: bool = False
) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, per row (or per row and unit)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl if per_unit else kl.sum(-1)


def reparameterised_draws(mean, logvar, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` reparameterised samples per row: z and eps, each ``(n, B, latent_dim)``."""
    eps = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * eps, eps


def fixed_normal_draws(n: int, dim: int, seed: int) -> torch.Tensor:
    """``(n, 1, dim)`` float32 standard-normal draws from a CPU generator seeded with
    ``seed``: the same on every device and for every batch, to be shared by all rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, dim), generator=generator)


def sample_chunks(total: int, elements_per_sample: int):
    """Split ``total`` samples into chunks of at most ~CHUNK_ELEMENTS decoder outputs."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, elements_per_sample))
    done = 0
    while done < total:
        n = min(per_chunk, total - done)
        yield n
        done += n


LOG_2PI = math.log(2 * math.pi)


def gaussian_latent_estimate(
    kind: str, log_px: Callable[[torch.Tensor], torch.Tensor], mean, logvar, draws
) -> torch.Tensor:
    """Per row, float64: the ELBO (``kind="elbo"``, the decoder's log-likelihood averaged
    over the draws minus the closed-form KL) or the importance-weighted log-likelihood
    (Burda et al. 2016) of q(z|x) = N(mean, exp(logvar)) against N(0, I), from
    standard-normal ``draws``: chunks of ``(n, B or 1, latent_dim)``. ``log_px`` maps
    ``(n, B, latent_dim)`` codes to log p(x|z) per code, ``(n * B,)``."""
    total, n, std = None, 0, torch.exp(0.5 * logvar)
    for eps in draws:
        z = mean + std * eps
        log_px_z = log_px(z).reshape(len(eps), -1)
        n += len(eps)
        if kind == "elbo":
            part = log_px_z.double().sum(0)
            total = part if total is None else total + part
            continue
        log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        # z = mean + std * eps, so log q(z|x) = log N(eps; 0, I) - sum log std
        log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)
        part = torch.logsumexp((log_px_z + log_pz - log_qz).double(), dim=0)
        total = part if total is None else torch.logaddexp(total, part)
    if kind == "elbo":
        return total / n - kl_to_standard_normal(mean, logvar).double()
    return total - math.log(n)
