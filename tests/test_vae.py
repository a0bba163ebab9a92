"""The ``vae`` plugin: SGVB loss terms, KL warm-up and its exact resume, the ELBO and
importance-weighted log-likelihood against numerical integration, decoders, the conv
backbone, hyperparameter errors, and the log-likelihood quality bar on digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aecore.layers
import aecore_plugins.vae as vae_module
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.io.model_folder import load, save
from aecore.layers import kl_to_standard_normal
from aecore.testing import IMAGE_SHAPE, ModelSpec, parametrize_with_checks
from aecore.training import Trainer
from aecore_plugins.vae import VariationalAutoencoder


def _x(n=8, shape=(12,), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _vae(**hparams):
    torch.manual_seed(0)
    hparams.setdefault("input_shape", (12,))
    hparams.setdefault("latent_dim", 3)
    return VariationalAutoencoder(**hparams)


# -- contract (the default configuration is checked by tests/test_conformance.py) -----
@parametrize_with_checks(
    [
        ModelSpec(VariationalAutoencoder, IMAGE_SHAPE, {"backbone": "conv", "channels": [8, 16]}),
        (VariationalAutoencoder, {"decoder": "gaussian", "hidden": [32]}),
        ModelSpec(
            VariationalAutoencoder,
            IMAGE_SHAPE,
            {"decoder": "gaussian", "decoder_std": 0.2, "backbone": "conv", "channels": [8]},
        ),
        ModelSpec(
            VariationalAutoencoder,
            IMAGE_SHAPE,
            {"backbone": "conv", "decoder": "gaussian", "channels": [8, 16]},
        ),
        (VariationalAutoencoder, {"warmup_steps": 3, "beta": 0.5, "hidden": [16]}),
    ]
)
def test_conformance_of_variants(model, check):
    check(model)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 17), (2, 1, 1)])
def test_conv_backbone_keeps_any_image_shape(shape):
    model = _vae(input_shape=shape, backbone="conv", decoder="gaussian").eval()
    x = _x(4, shape)
    assert model(x).shape == x.shape
    assert model.sample(3).shape == (3, *shape)
    assert torch.isfinite(model.log_likelihood(x, k=5)).all()


def test_encode_is_the_posterior_mean_and_forward_decodes_it():
    model = _vae().eval()
    x = _x()
    mean, logvar = model.posterior(x)
    assert torch.equal(model.encode(x), mean)
    y = model(x)
    assert torch.equal(y, model.decode(mean))
    assert torch.equal(y, model(x))
    # Bernoulli decoder: decode gives probabilities, the sigmoid of the logits
    logits, _ = model._decoder_output(mean)
    assert torch.allclose(y.flatten(1), torch.sigmoid(logits))
    assert float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1


# -- loss terms -----------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    mean=st.lists(st.floats(-5, 5), min_size=1, max_size=6),
    logvar=st.floats(-6, 4),
)
def test_kl_term_is_the_closed_form_gaussian_kl(mean, logvar):
    m = torch.tensor([mean], dtype=torch.float64)
    lv = torch.full_like(m, logvar)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, torch.exp(0.5 * lv)), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    assert torch.allclose(kl_to_standard_normal(m, lv), expected)


@pytest.mark.parametrize("decoder_std", ["learned", 0.3])
def test_gaussian_log_px_is_the_normal_density(decoder_std):
    model = _vae(decoder="gaussian", decoder_std=decoder_std)
    x, z = _x(5), torch.randn(5, 3)
    loc, std = model._decoder_output(z)
    scale = std if std is not None else torch.full_like(loc, decoder_std)
    expected = torch.distributions.Normal(loc, scale).log_prob(x).sum(-1)
    assert torch.allclose(model._log_px(x, z), expected, atol=1e-4)


def test_bernoulli_log_px_is_the_bernoulli_log_probability_on_binary_inputs():
    model = _vae()
    x, z = (_x(5) > 0.5).float(), torch.randn(5, 3)
    logits, _ = model._decoder_output(z)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    assert torch.allclose(model._log_px(x, z), expected, atol=1e-5)


def test_learned_decoder_std_is_floored():
    model = _vae(decoder="gaussian", min_decoder_std=0.05)
    with torch.no_grad():
        model.decoder_net[-1].bias.fill_(-50.0)  # softplus(-50) ~ 0: only the floor is left
    with torch.no_grad():
        _, std = model._decoder_output(torch.randn(4, 3))
    assert float(std.min()) >= 0.05
    assert float(std.min()) == pytest.approx(0.05, rel=1e-3)


def test_loss_is_recon_plus_beta_kl_in_nats_per_input():
    model = _vae(beta=3.0).train()
    x = _x()
    torch.manual_seed(1)
    terms = model.loss(x)
    assert set(terms) == {"loss", "recon", "kl"}
    assert torch.allclose(terms["loss"], terms["recon"] + 3.0 * terms["kl"])
    # the one-sample ELBO estimate of these inputs, with the same draw of eps
    torch.manual_seed(1)
    mean, logvar = model.posterior(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    log_px = model._log_px(x, z)
    assert torch.allclose(terms["recon"], -log_px.mean())


def test_kl_warmup_ramps_beta_over_training_steps_only():
    model = _vae(beta=2.0, warmup_steps=4).train()
    x = _x()
    betas = [float(model.loss(x)["beta"]) for _ in range(6)]
    assert betas == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert int(model.steps_taken) == 6
    model.eval()
    with torch.no_grad():
        terms = model.loss(x)  # validation: the full beta, and no step counted
    assert float(terms["beta"]) == 2.0
    assert torch.allclose(terms["loss"], terms["recon"] + 2.0 * terms["kl"])
    assert int(model.steps_taken) == 6


@settings(max_examples=20, deadline=None)
@given(beta=st.floats(0.0, 5.0), warmup=st.integers(1, 12), calls=st.integers(1, 16))
def test_warmup_schedule_is_linear_then_flat(beta, warmup, calls):
    model = _vae(beta=beta, warmup_steps=warmup, hidden=[4]).train()
    x = _x(2)
    got = [float(model.loss(x)["beta"]) for _ in range(calls)]
    expected = [beta * min(1.0, step / warmup) for step in range(1, calls + 1)]
    assert got == pytest.approx(expected)


def test_warmup_step_count_is_saved_with_the_model(tmp_path):
    model = _vae(beta=1.0, warmup_steps=10).train()
    for _ in range(3):
        model.loss(_x())
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert int(loaded.steps_taken) == 3
    assert loaded.current_beta() == model.current_beta() == pytest.approx(0.4)


def test_resume_continues_the_warmup_exactly(tmp_path):
    data = _x(100, seed=3).numpy()

    def fresh(draws=10):
        torch.manual_seed(0)
        return VariationalAutoencoder(
            input_shape=(12,), latent_dim=3, hidden=[16], warmup_steps=10, score_draws=draws
        )

    straight = fresh()
    Trainer(epochs=2, batch_size=16, seed=0, device="cpu", progress=False).fit(straight, data)
    resumed = fresh()
    Trainer(epochs=1, batch_size=16, seed=0, device="cpu", out_dir=tmp_path, progress=False).fit(
        resumed, data
    )
    assert int(resumed.steps_taken) == 6  # one epoch of 90 rows (10 held out) in batches of 16
    # a new process: only the checkpoint carries the step count; how the trained model
    # scores (score_draws, as in runs saved before the setting existed) may differ
    again = fresh(draws=50)
    Trainer(
        epochs=2, batch_size=16, seed=0, device="cpu", out_dir=tmp_path, resume=True, progress=False
    ).fit(again, data)
    assert int(again.steps_taken) == int(straight.steps_taken) == 12
    for key, value in straight.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


# -- likelihood estimates ---------------------------------------------------------------
def _exact_log_px(model, x):
    """log p(x) = log ∫ p(x|z) N(z; 0, 1) dz by quadrature (a 1-D code)."""
    grid = torch.linspace(-12.0, 12.0, 24001)
    step = float(grid[1] - grid[0])
    with torch.no_grad():
        out = []
        for row in x:
            log_joint = model._log_px(row[None], grid[:, None]) - 0.5 * (
                grid.pow(2) + math.log(2 * math.pi)
            )
            out.append(float(torch.logsumexp(log_joint.double(), 0)) + math.log(step))
    return torch.tensor(out)


def test_log_likelihood_converges_to_log_px_and_bounds_it(monkeypatch):
    # small chunks and row batches: the estimate must not depend on how work is split
    monkeypatch.setattr(aecore.layers, "CHUNK_ELEMENTS", 3000)
    monkeypatch.setattr(vae_module, "_ROW_BATCH", 3)
    model = _vae(input_shape=(6,), latent_dim=1, hidden=[8]).eval()
    with torch.no_grad():
        # an x-independent posterior N(0.3, e^0.5), wider than the prior (so the importance
        # weights are bounded) and off-centre: a wrong q density or sign would show
        model.encoder_head.weight.zero_()
        model.encoder_head.bias.copy_(torch.tensor([0.3, 0.5]))
        model.decoder_net[0].weight.mul_(4.0)  # p(x|z) varies strongly with z
    x = _x(4, (6,), seed=5)
    exact = _exact_log_px(model, x)
    gen = torch.Generator().manual_seed(0)
    iwae = model.log_likelihood(x, k=10000, generator=gen)
    assert torch.allclose(iwae, exact, atol=0.03), (iwae, exact)
    monkeypatch.undo()
    elbo = model.elbo(x, samples=4000, generator=gen)
    assert (elbo < exact - 0.05).all()  # the ELBO is a (here loose) lower bound
    # k = 1: the one-sample estimate has the ELBO's expectation
    one = model.log_likelihood(x.repeat(4000, 1), k=1, generator=gen).reshape(4000, -1)
    assert torch.allclose(one.mean(0), elbo, atol=0.1)


@pytest.mark.parametrize("kind", ["elbo", "log_likelihood"])
def test_anomaly_scores_are_a_rows_own_and_what_the_export_traces(kind):
    # wide rows make the scored batch split its draws into chunks: a row must score the
    # same alone, in a batch, and in the one-pass form an ONNX export traces
    model = _vae(input_shape=(700,), latent_dim=4, hidden=[8]).eval()
    x = _x(600, (700,))
    batch = model.score(x, kind=kind)
    alone = torch.cat([model.score(x[i : i + 1], kind=kind) for i in (0, 511, 599)])
    torch.testing.assert_close(alone, batch[[0, 511, 599]], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            model.traceable_score(x[:8], kind), batch[:8], rtol=1e-5, atol=1e-5
        )
    assert model.double().score(x[:3].double(), kind=kind).dtype == torch.float64


def test_the_anomaly_scores_take_score_draws_a_row_and_old_folders_keep_theirs(tmp_path):
    x = _x(20)
    model = _vae(score_draws=3).eval()
    assert model.score_passes == {"elbo": 3, "log_likelihood": 3}
    torch.testing.assert_close(model.score(x), -model.log_likelihood(x, 3, seed=0))
    torch.testing.assert_close(model.score(x, kind="elbo"), -model.elbo(x, 3, seed=0))
    assert not torch.allclose(model.score(x), -model.log_likelihood(x, 10, seed=0))
    assert _vae().score_draws == 10  # ranks rows as 100 draws do, at a tenth of the cost
    # a folder saved before the setting existed scores as it did (ELBO from 10 draws,
    # likelihood from 100), so the threshold saved with it still applies
    save(_vae(), tmp_path / "m")
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    del record["config"]["score_draws"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    old = load(tmp_path / "m")
    assert old.score_draws is None and len(old.fixed_draws) == 100
    torch.testing.assert_close(old.score(x), -old.log_likelihood(x, 100, seed=0))
    # the ELBO's 10 draws are the first of those 100, as before
    legacy = _vae(score_draws=None).eval()
    torch.testing.assert_close(old.score(x, kind="elbo"), legacy.score(x, kind="elbo"))


def test_a_model_pickled_before_score_draws_unpickles_and_scores_as_it_did():
    import pickle

    x = _x(20)
    old = _vae(score_draws=None).eval()  # what older versions built: 100 draws
    # as older versions pickled it: the draws buffer under the setting's name, no setting
    old._buffers["score_draws"] = old._buffers.pop("fixed_draws")
    old._non_persistent_buffers_set = {"score_draws"}
    del old.__dict__["score_draws"]
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.score_draws is None and len(loaded.fixed_draws) == 100
    assert "fixed_draws" not in loaded.state_dict()  # still not saved in folders
    torch.testing.assert_close(loaded.score(x), -loaded.log_likelihood(x, 100, seed=0))
    legacy = _vae(score_draws=None).eval()
    torch.testing.assert_close(loaded.score(x, kind="elbo"), legacy.score(x, kind="elbo"))


def test_bernoulli_decoder_rejects_inputs_outside_unit_interval():
    model = _vae()
    x = _x() * 3 - 1
    with pytest.raises(DataError, match=r"decoder='bernoulli' needs inputs in \[0, 1\].*got"):
        model.loss(x)
    with pytest.raises(DataError, match="minmax"):
        model.log_likelihood(x, k=2)


def test_sample_draws_from_the_prior():
    model = _vae().eval()
    a = model.sample(6, generator=torch.Generator().manual_seed(1))
    b = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 12) and torch.equal(a, b)
    binary = model.sample(50, mean=False)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    fixed = _vae(decoder="gaussian", decoder_std=0.5)
    noisy = fixed.sample(4000, mean=False, generator=torch.Generator().manual_seed(2))
    means = fixed.sample(4000, generator=torch.Generator().manual_seed(2))
    assert float((noisy - means).std()) == pytest.approx(0.5, rel=0.05)


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"beta": -0.5}, r"beta must be a number in \[0, inf\); got -0.5"),
        ({"decoder": "poisson"}, r"decoder must be one of 'bernoulli', 'gaussian'; got 'poisson'"),
        ({"backbone": "rnn"}, r"backbone must be one of 'mlp', 'conv'; got 'rnn'"),
        ({"decoder_std": 0}, r"decoder_std must be 'learned' or a number in \(0, inf\).*got 0"),
        ({"decoder_std": "fixed"}, r"decoder_std must be 'learned' or .*got 'fixed'"),
        ({"decoder_std": 0.1}, r"decoder_std=0.1 applies to decoder='gaussian' only"),
        ({"min_decoder_std": 0.0}, r"min_decoder_std must be a number in \(0, inf\); got 0.0"),
        ({"warmup_steps": -1}, r"warmup_steps must be an int in \[0, inf\]; got -1"),
        ({"warmup_steps": 2.5}, r"warmup_steps must be an int in \[0, inf\]; got 2.5"),
        ({"hidden": [0]}, r"hidden must be a list of positive ints; got \[0\]"),
        ({"activation": "swish"}, r"activation must be one of .*; got 'swish'"),
        ({"channels": []}, r"channels must be a non-empty list of positive ints; got \[\]"),
        ({"kernel_size": 1}, r"kernel_size must be an int in \[2, inf\]; got 1"),
        ({"score_draws": 0}, r"score_draws must be an int in \[1, inf\]; got 0"),
        (
            {"backbone": "conv"},
            r"backbone='conv' needs a 3-D input_shape \(C, H, W\); got input_shape=\(12,\) "
            r"\(1-D\): for rows of features use backbone='mlp'; for images train on",
        ),
    ],
)
def test_bad_hyperparameters_name_parameter_value_and_range(hparams, message):
    with pytest.raises(ConfigError, match=message):
        _vae(**hparams)


def test_bad_arguments_name_parameter_value_and_range():
    model = _vae()
    x = _x()
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, inf\]; got 0"):
        model.log_likelihood(x, k=0)
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, inf\]; got 2.5"):
        model.log_likelihood(x, k=2.5)
    with pytest.raises(ConfigError, match=r"samples must be an int in \[1, inf\]; got 0"):
        model.elbo(x, samples=0)
    with pytest.raises(ConfigError, match=r"n must be an int in \[1, inf\]; got -3"):
        model.sample(-3)
    with pytest.raises(ShapeError, match=r"expects input of shape \(B, 12\); got \(8, 13\)"):
        model.log_likelihood(_x(8, (13,)), k=2)


# -- quality ------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_log_likelihood_reaches_the_bar_and_early_stopping_costs_nothing(tmp_path, capsys):
    """The quality bar: digits, 8-D code, Bernoulli decoder on [0, 1] pixels, test
    log-likelihood (k = 1000) >= -23.4 nats per image (a plain reference VAE: -23.44),
    with early stopping on a validation set of 180 rows; and that run ends within 0.2
    nats of the same budget without early stopping."""
    from aecore.cli import main
    from aecore.pipeline import train

    recipe = VariationalAutoencoder.demo.train.replace(seed=0, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small nets: threads cost more than they give (and reproducible)
    try:
        result = train("vae", "digits", tmp_path / "vae", latent_dim=8, config=recipe)
        full = train("vae", "digits", None, latent_dim=8, config=recipe.replace(patience=None))
    finally:
        torch.set_num_threads(threads)
    m = result.metrics
    assert m["test_log_likelihood_k1000"] >= -23.4, m
    assert m["test_log_likelihood_k1000"] >= full.metrics["test_log_likelihood_k1000"] - 0.2
    assert m["test_elbo"] < m["test_log_likelihood_k1000"]  # the bound is loose, IWAE tighter
    assert main(["eval", str(tmp_path / "vae")]) == 0
    out = capsys.readouterr().out
    assert f"test_log_likelihood_k1000: {m['test_log_likelihood_k1000']:.6g}" in out
    assert "test_elbo: " in out
    figures = result.model.demo_figures(result.prepared, tmp_path / "figs")
    assert [p.name for _, p in figures] == ["samples.png", "traversal.png"]
    assert all(p.stat().st_size > 1000 for _, p in figures)


def test_seeded_estimates_do_not_depend_on_score_draws():
    # a seed's first draws came from the scores' buffer, whose length score_draws sets,
    # so log_likelihood(x, 8, seed=0) changed with an unrelated setting
    x = _x(6)
    a = _vae(score_draws=10).eval().log_likelihood(x, 8, seed=0)
    b = _vae(score_draws=100).eval().log_likelihood(x, 8, seed=0)
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="generator: a torch.Generator, without a seed"):
        _vae().elbo(x, 2, seed=1, generator=torch.Generator())
    with pytest.raises(ConfigError, match="seed must be an int"):
        _vae().elbo(x, 2, seed=True)


def test_the_kl_warm_up_is_refused_under_lbfgs():
    # L-BFGS calls the loss ~10 times a step: the warm-up ended ~10x early
    with pytest.raises(ConfigError, match="warmup_steps counts loss calls"):
        aecore.Trainer(epochs=1, optimizer="lbfgs", progress=False).fit(
            _vae(warmup_steps=100), _x(16)
        )
