"""The ``sparse`` plugin: KL / L1 / k-sparse penalties, the logged activity terms,
overcomplete codes, hyperparameter errors, and edge-like filters on image patches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aecore import ops
from aecore.data import load_data, prepare
from aecore.errors import ConfigError
from aecore.testing import parametrize_with_checks
from aecore_plugins.sparse import SparseAutoencoder


# the default (penalty="kl") is checked by tests/test_conformance.py
@parametrize_with_checks(
    [
        (SparseAutoencoder, {"penalty": "l1"}),
        (SparseAutoencoder, {"penalty": "topk"}),
        (
            SparseAutoencoder,
            {"penalty": "topk", "k": 2, "alpha": 1.5, "output_activation": "sigmoid"},
        ),
    ]
)
def test_conformance_of_variants(model, check):
    check(model)


def _x(n=32, d=64, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def test_overcomplete_code():
    model = SparseAutoencoder(input_shape=(1, 8, 8), latent_dim=100)
    x = torch.rand(4, 1, 8, 8)
    assert model.encode(x).shape == (4, 100)
    assert model(x).shape == x.shape


@settings(max_examples=20, deadline=None)
@given(
    latent_dim=st.integers(1, 80),
    k_fraction=st.floats(0.0, 1.0),
    alpha=st.floats(1.0, 3.0),
    batch=st.integers(1, 6),
)
def test_topk_keeps_k_codes_in_training_and_alpha_k_at_inference(
    latent_dim, k_fraction, alpha, batch
):
    k = max(1, round(k_fraction * latent_dim))
    alpha = min(alpha, latent_dim / k)  # round(alpha * k) must fit in the code
    torch.manual_seed(0)
    model = SparseAutoencoder(
        input_shape=(20,), latent_dim=latent_dim, penalty="topk", k=k, alpha=alpha
    )
    x = _x(batch, 20)
    assert model.inference_k == round(alpha * k) <= latent_dim
    # random continuous inputs: no ties and no exact zeros among the kept codes
    assert torch.equal((model.encode(x) != 0).sum(1), torch.full((batch,), model.inference_k))
    h = model._hidden(x, model.k)
    assert torch.equal((h != 0).sum(1), torch.full((batch,), k))
    # the kept codes are the k largest pre-sparsity activations
    dense = model.encoder(x - model.input_mean)
    assert torch.equal(h, ops.reference.topk_sparsify(dense, k))


def test_loss_terms_are_ngs_objective():
    torch.manual_seed(0)
    model = SparseAutoencoder(
        input_shape=(64,), latent_dim=30, penalty="kl", rho=0.1, beta=2.0, weight_decay=1e-3
    )
    x = _x()
    model.init_from_data(x)
    terms = model.loss(x)
    h = torch.sigmoid(model.encoder(x - x.mean(0)))
    recon = (model.decoder(h) - x).pow(2).mean()
    decay = 0.5e-3 * (model.encoder.weight.square().sum() + model.decoder.weight.square().sum())
    kl = ops.reference.kl_sparsity(h, 0.1, 2.0)
    assert torch.allclose(terms["recon"], recon)
    assert torch.allclose(terms["sparsity"], kl)
    assert torch.allclose(terms["weight_decay"], decay)
    # half the summed squared error per example, as in Ng's notes
    assert torch.allclose(terms["loss"], 32 * recon + kl + decay)
    assert torch.allclose(terms["mean_activation"], h.mean())


def test_l1_penalty_is_lambda_times_mean_summed_activation():
    torch.manual_seed(0)
    model = SparseAutoencoder(
        input_shape=(64,), latent_dim=30, penalty="l1", l1_lambda=0.01, pca_start=False
    )
    x = _x()
    h = torch.relu(model.encoder(x))
    assert model.activation == "relu"
    assert torch.allclose(model.loss(x)["sparsity"], 0.01 * h.abs().sum(1).mean())


def test_dead_fraction_counts_units_silent_on_the_whole_batch():
    model = SparseAutoencoder(input_shape=(64,), latent_dim=10, penalty="l1", pca_start=False)
    with torch.no_grad():
        model.encoder.bias[:3] = -1e3  # relu(-big) == 0 for every example: 3 dead units
        model.encoder.bias[3:] = 1e3
    terms = model.loss(_x())
    assert float(terms["dead_fraction"]) == pytest.approx(0.3)
    model = SparseAutoencoder(input_shape=(64,), latent_dim=4, penalty="kl")
    with torch.no_grad():
        model.encoder.bias[:] = torch.tensor([-50.0, -50.0, 0.0, 0.0])  # sigmoid ~ 2e-22
    assert float(model.loss(_x())["dead_fraction"]) == pytest.approx(0.5)


def test_evaluation_metrics_report_the_codes_activity_on_test_data():
    model = SparseAutoencoder(input_shape=(64,), latent_dim=40, penalty="topk", k=4, alpha=2.0)
    metrics = model.evaluation_metrics(_x(n=50), None)
    assert set(metrics) == {"mean_activation", "dead_fraction", "nonzero_fraction"}
    assert metrics["nonzero_fraction"] == pytest.approx(8 / 40)  # alpha * k codes per row
    assert 0.0 <= metrics["dead_fraction"] <= 1 - 8 / 40


def test_encode_needs_no_training_mode_and_is_deterministic():
    model = SparseAutoencoder(input_shape=(64,), latent_dim=40, penalty="topk", k=5).train()
    x = _x()
    assert torch.equal(model.encode(x), model.encode(x))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"rho": 0.0}, "rho must be a number in (0, 1); got 0.0"),
        ({"rho": 1.0}, "rho must be a number in (0, 1); got 1.0"),
        ({"rho": 1.5}, "rho must be a number in (0, 1); got 1.5"),
        ({"beta": -1}, "beta must be a number in [0, inf); got -1"),
        ({"l1_lambda": -0.1}, "l1_lambda must be a number in [0, inf); got -0.1"),
        ({"k": 21}, "k must be an int in [1, 20]; got 21 (k counts kept code units: at most"),
        ({"k": 0}, "k must be an int in [1, 20]; got 0"),
        ({"k": 2.5}, "k must be an int in [1, 20]; got 2.5"),
        ({"alpha": 0.5}, "alpha must be a number in [1, inf); got 0.5"),
        ({"k": 8, "alpha": 3.0}, "alpha must be in [1, 2.5] so that round(alpha * k)"),
        ({"penalty": "l2"}, "penalty must be one of 'kl', 'l1', 'topk'; got 'l2'"),
        ({"penalty": "kl", "activation": "relu"}, "penalty='kl' needs activation='sigmoid'"),
        ({"penalty": "kl", "pca_start": True}, "pca_start=true needs an undercomplete code"),
        ({"pca_start": "yes"}, "pca_start must be true, false or 'auto'; got 'yes'"),
        ({"weight_decay": -1e-4}, "weight_decay must be a number in [0, inf); got -0.0001"),
        ({"output_activation": "tanh"}, "output_activation must be one of"),
    ],
)
def test_bad_hyperparameters_are_named(hparams, message):
    with pytest.raises(ConfigError) as info:
        SparseAutoencoder(input_shape=(64,), latent_dim=20, **hparams)
    assert message in str(info.value)


def test_config_round_trip_resolves_auto_and_default_k():
    model = SparseAutoencoder(input_shape=(64,), latent_dim=100, penalty="topk")
    config = model.get_config()
    assert (config["activation"], config["k"]) == ("identity", 25)
    assert SparseAutoencoder(**config).get_config() == config


# -- filters learned on natural-image patches -------------------------------------
def _dct_basis(n: int = 8) -> torch.Tensor:
    """Orthonormal 2-D DCT-II basis, (n*n, n*n): row u*n+v is the (u, v) cosine image."""
    i = torch.arange(n, dtype=torch.float64)
    c = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n)
    c[0] /= math.sqrt(2)
    c *= math.sqrt(2 / n)
    return torch.einsum("ux,vy->uvxy", c, c).reshape(n * n, n * n)


def neighbour_correlation(filters: torch.Tensor) -> torch.Tensor:
    """Per filter (N, 8, 8): correlation of horizontally and vertically adjacent weights
    (about 0 for white noise, near 1 for smooth edges)."""
    w = filters - filters.mean((1, 2), keepdim=True)
    a = torch.cat([w[:, :, 1:].flatten(1), w[:, 1:, :].flatten(1)], 1)
    b = torch.cat([w[:, :, :-1].flatten(1), w[:, :-1, :].flatten(1)], 1)
    return (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).sqrt()


def frequency_concentration(filters: torch.Tensor, top: int = 6) -> torch.Tensor:
    """Per filter: share of its non-constant energy in its ``top`` strongest 2-D cosine
    components (of 63). White noise spreads evenly (about 0.4 for top=6); an oriented
    edge or bar needs only a few."""
    coeffs = filters.flatten(1).double() @ _dct_basis().T
    energy = coeffs[:, 1:].square()
    return energy.sort(1, descending=True).values[:, :top].sum(1) / energy.sum(1)


@pytest.mark.slow
def test_kl_sparse_autoencoder_learns_edge_like_filters_on_patches():
    """Ng's 64 -> 100 sigmoid sparse autoencoder (rho=0.01, beta=3, weight decay 1e-4)
    on 8x8 patches: its filters turn from white noise into smooth, oriented edges
    (measured by neighbour correlation and by concentration on a few spatial
    frequencies) while the mean activation drops from ~0.5 to rho. Full-batch L-BFGS,
    as in Ng's exercise, converges in a few seconds."""
    x = torch.as_tensor(load_data("patches:2000").x)
    torch.manual_seed(0)
    model = SparseAutoencoder(
        input_shape=(64,),
        latent_dim=100,
        penalty="kl",
        rho=0.01,
        beta=3.0,
        weight_decay=1e-4,
        output_activation="sigmoid",
    )
    model.init_from_data(x)
    before = model.filters().reshape(-1, 8, 8).clone()
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=100, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = model.loss(x)["loss"]
        loss.backward()
        return loss

    optimizer.step(closure)
    after = model.filters().reshape(-1, 8, 8)
    terms = model.loss(x)

    assert float(neighbour_correlation(before).median()) < 0.2
    assert float(neighbour_correlation(after).median()) > 0.7
    assert float((neighbour_correlation(after) > 0.5).float().mean()) > 0.8
    assert float(frequency_concentration(before).median()) < 0.55
    assert float(frequency_concentration(after).median()) > 0.85
    assert 0.005 < float(terms["mean_activation"]) < 0.02
    assert float(terms["dead_fraction"]) < 0.1
    # and it reconstructs: well under the patches' variance (what the mean would score)
    assert float(terms["recon"].detach()) < 0.8 * float(x.var(0).mean())


def test_demo_writes_the_filter_grid(tmp_path):
    model = SparseAutoencoder(**{"input_shape": (64,), "latent_dim": 100, **_demo_hparams()})
    [(caption, path)] = model.demo_figures(prepare("patches:500", normalize="none"), tmp_path)
    assert "filters" in caption and path.exists() and path.stat().st_size > 1000
    # vectors that are not square images get no filter figure
    assert SparseAutoencoder(input_shape=(12,), latent_dim=5).demo_figures(None, tmp_path) == []


def _demo_hparams():
    recipe = SparseAutoencoder.demo
    assert (recipe.data, recipe.latent_dim, recipe.normalize) == ("patches", 100, "none")
    return recipe.hparams
