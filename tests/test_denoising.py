"""The ``denoising`` plugin: corruption processes, clean targets, clean inference,
hyperparameter errors, and the denoising quality bar on digits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aecore.data import prepare
from aecore.errors import ConfigError
from aecore.pipeline import train
from aecore.testing import parametrize_with_checks
from aecore_plugins.ae import PlainAutoencoder
from aecore_plugins.denoising import CORRUPTIONS, DenoisingAutoencoder, corrupt


# the default (masking) is checked by tests/test_conformance.py
@parametrize_with_checks(
    [(DenoisingAutoencoder, {"corruption": c}) for c in ("gaussian", "salt_pepper")]
)
def test_conformance_of_other_corruptions(model, check):
    check(model)


def _x(n=64, d=50, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@example(p=1.1754943508222875e-38, seed=29409)  # one element masked at a p of 1e-38
def test_masking_zeroes_a_fraction_p_and_keeps_the_rest(p, seed):
    x = _x(seed=seed) + 0.5  # no zeros of its own
    y = corrupt(x, "masking", p=p, generator=torch.Generator().manual_seed(seed))
    masked = y == 0
    assert torch.equal(y[~masked], x[~masked])
    # 3200 Bernoulli(p) draws: the rate is within 5 standard deviations of p, give or
    # take a few draws: torch.rand's float32 steps of 2**-24 include 0, so even p=1e-38
    # hits one element in 2**24 (a 5-sd band is no bound for such rare counts)
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(float(masked.float().mean()) - p) <= 5 * sd + 3 / x.numel()


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_salt_pepper_sets_extremes_at_rate_p(p, seed):
    x = _x(seed=seed)
    y = corrupt(x, "salt_pepper", p=p, generator=torch.Generator().manual_seed(seed))
    changed = y != x
    assert torch.isin(y[changed], torch.stack([x.min(), x.max()])).all()
    sd = (p * (1 - p) / x.numel()) ** 0.5
    # an element already at an extreme can be "hit" without changing: at most 2 of them
    rate = float(changed.double().mean())  # float32 would round p=1's 3198/3200 below
    assert rate <= p + 5 * sd + 3 / x.numel()  # rare hits at tiny p (see masking's test)
    assert rate >= p - 5 * sd - 2 / x.numel() - 1e-12


@settings(max_examples=15, deadline=None)
@given(sigma=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_gaussian_noise_has_std_sigma(sigma, seed):
    x = _x(n=200, seed=seed)
    y = corrupt(x, "gaussian", sigma=sigma, generator=torch.Generator().manual_seed(seed))
    assert float((y - x).std()) == pytest.approx(sigma, rel=0.05, abs=1e-6)
    assert float((y - x).mean()) == pytest.approx(0.0, abs=0.05 * sigma + 1e-6)


def test_corrupt_leaves_its_input_alone():
    x = _x()
    before = x.clone()
    for kind in CORRUPTIONS:
        corrupt(x, kind, sigma=1.0, p=0.5)
    assert torch.equal(x, before)


def test_loss_targets_the_clean_input():
    """With zero noise the loss is exactly the plain autoencoder's reconstruction loss."""
    torch.manual_seed(0)
    dae = DenoisingAutoencoder(input_shape=(20,), latent_dim=4, corruption="gaussian", sigma=0.0)
    ae = PlainAutoencoder(input_shape=(20,), latent_dim=4)
    ae.load_state_dict(dae.state_dict())
    x = _x(d=20)
    assert torch.allclose(dae.loss(x)["loss"], ae.loss(x)["loss"])
    # with noise, the loss is the error of the noisy reconstruction against clean x
    dae.sigma = 0.5
    torch.manual_seed(7)
    got = dae.loss(x)["recon"]
    torch.manual_seed(7)
    noisy = corrupt(x, "gaussian", sigma=0.5)
    assert torch.allclose(got, (dae(noisy) - x).pow(2).mean())


def test_noise_is_fresh_at_every_step_but_inference_is_clean():
    model = DenoisingAutoencoder(input_shape=(20,), latent_dim=4, p=0.5).train()
    x = _x(d=20)
    assert not torch.equal(model.loss(x)["loss"], model.loss(x)["loss"])
    # encode/forward never corrupt, even in training mode
    assert torch.equal(model.encode(x), model.encode(x))
    ae = PlainAutoencoder(input_shape=(20,), latent_dim=4)
    ae.load_state_dict(model.state_dict())
    assert torch.equal(model(x), ae(x))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_denoising_score_is_fixed_and_a_rows_own(corruption):
    # the denoising score restores rows from fixed corruptions: the same score
    # for a row whatever its batch or call, the reconstruction error plus a positive term
    torch.manual_seed(0)
    model = DenoisingAutoencoder(input_shape=(12,), latent_dim=3, corruption=corruption).eval()
    x = torch.rand(10, 12)
    score = model.score(x, kind="denoising")
    assert model.default_score_kind == "reconstruction"  # it detects better on 2 of 3 sets
    torch.testing.assert_close(model.score(x[3:5], kind="denoising"), score[3:5])
    torch.testing.assert_close(model.score(x.flip(0), kind="denoising"), score.flip(0))
    assert (score > model.score(x)).all()
    # so also for rows beyond a bounded model's range: both errors are measured against
    # the row as given (the restoration's against the clipped row once fell below it)
    bounded = DenoisingAutoencoder(
        input_shape=(12,), latent_dim=3, corruption=corruption, output_activation="sigmoid"
    ).eval()
    far = x.clone()
    far[:, 0] = torch.linspace(1.0, 4.0, 10)
    assert (bounded.score(far, kind="denoising") > bounded.score(far)).all()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"sigma": -0.1}, "sigma must be a number in [0, inf); got -0.1"),
        ({"p": 1.5}, "p must be a number in [0, 1]; got 1.5"),
        ({"p": -0.2}, "p must be a number in [0, 1]; got -0.2"),
        ({"corruption": "blur"}, "corruption must be one of 'gaussian', 'masking', 'salt_pepper'"),
        ({"hidden": [0]}, "hidden must be a list of positive ints"),
    ],
)
def test_bad_hyperparameters_are_named(hparams, message):
    with pytest.raises(ConfigError) as info:
        DenoisingAutoencoder(input_shape=(20,), latent_dim=4, **hparams)
    assert message in str(info.value)


def test_config_round_trip_keeps_the_noise():
    model = DenoisingAutoencoder(
        input_shape=(1, 8, 8), latent_dim=5, corruption="salt_pepper", p=0.2, hidden=[32]
    )
    rebuilt = DenoisingAutoencoder(**model.get_config())
    assert (rebuilt.corruption, rebuilt.p, rebuilt.hidden) == ("salt_pepper", 0.2, [32])


@pytest.mark.slow
def test_denoises_masked_digits_to_half_the_corrupted_error(tmp_path):
    """The denoising bar: on digits with masking p=0.3, reconstructions of corrupted test
    inputs have at most half the MSE (against the clean images) of the corrupted inputs.
    A plain autoencoder (p=0) of the same shape is worse at it: the noise in training
    is what teaches denoising."""
    results = {}
    for p in (0.3, 0.0):
        result = train(
            "denoising",
            "digits",
            None,
            latent_dim=8,
            hparams={"corruption": "masking", "p": p},
            epochs=20,
            progress=False,
        )
        test = torch.as_tensor(result.prepared.view("test").to_numpy())
        result.model.p = 0.3  # both models face the same corruption at test time
        results[p] = result.model.denoising_mse(test, torch.Generator().manual_seed(0))
    dae = results[0.3]
    assert dae["denoised_mse"] <= 0.5 * dae["corrupted_mse"], dae
    assert dae["denoised_mse"] < results[0.0]["denoised_mse"], results


def test_demo_figure_and_metrics(tmp_path):
    prepared = prepare("digits")
    model = DenoisingAutoencoder(input_shape=(64,), latent_dim=4).eval()
    [(caption, path)] = model.demo_figures(prepared, tmp_path)
    assert "corrupted" in caption and path.exists() and path.stat().st_size > 1000
    test = torch.as_tensor(prepared.view("test").to_numpy())
    metrics = model.evaluation_metrics(test, prepared)
    assert set(metrics) == {
        "corrupted_mse", "denoised_mse", "pca_denoised_mse", "denoised_vs_pca"
    }  # fmt: skip
    assert metrics["denoised_vs_pca"] == pytest.approx(
        metrics["denoised_mse"] / metrics["pca_denoised_mse"]
    )
    assert metrics["corrupted_mse"] > 0


@pytest.mark.parametrize("d", [1, 3])
def test_every_fixed_corruption_corrupts_a_narrow_row(d):
    # on three features p=0.3 masked none of them: the "denoising" score was exactly
    # twice the reconstruction error
    model = DenoisingAutoencoder(input_shape=(d,), latent_dim=1, corruption="masking", p=0.3)
    x = torch.rand(5, d) + 0.5  # no zeros, which masking would leave as they are
    for corrupted in model.fixed_corruptions(x):
        assert (corrupted != x).any(1).all()
