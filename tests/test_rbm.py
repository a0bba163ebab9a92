"""The ``rbm`` plugin: energies, the pseudo-likelihood estimator, training through the
Trainer (exact resume), scikit-learn comparison, bad input."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aecore.data import prepare
from aecore.errors import ConfigError, DataError
from aecore.training import Trainer
from aecore_plugins.rbm import RBM, DataRangeWarning, NonBinaryDataWarning


@pytest.fixture(scope="module")
def digits():
    p = prepare("digits", seed=0)  # minmax: digits / 16, in [0, 1] as BernoulliRBM expects
    return p.view("train").to_numpy(), p.view("test").to_numpy()


def random_rbm(v, h, seed, **hparams):
    torch.manual_seed(seed)
    rbm = RBM(input_shape=(v,), latent_dim=h, **hparams)
    with torch.no_grad():
        rbm.W.normal_(0, 1)
        rbm.b_v.normal_(0, 1)
        rbm.b_h.normal_(0, 1)
    return rbm.double()


# -- energies -------------------------------------------------------------------------
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_free_energy_sums_out_the_hidden_units(n_visible, n_hidden, seed):
    """F(v) = -log sum_h exp(-E(v, h)), E = -v.b_v - h.b_h - v W h, by enumeration."""
    rbm = random_rbm(n_visible, n_hidden, seed)
    states = torch.tensor(
        list(itertools.product([0.0, 1.0], repeat=n_visible)), dtype=torch.float64
    )
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n_hidden)), dtype=torch.float64)
    with torch.no_grad():
        energy = -(states @ rbm.b_v)[:, None] - (hs @ rbm.b_h)[None] - states @ rbm.W @ hs.T
        expected = -torch.logsumexp(-energy, dim=1)
        assert torch.allclose(rbm.free_energy(states), expected, atol=1e-9)


def test_gaussian_visible_free_energy_matches_numerical_integral():
    # one Gaussian visible unit, two binary hidden units: F(v) up to the same constant
    rbm = random_rbm(1, 2, seed=3, visible="gaussian")
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)), dtype=torch.float64)
    v = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    with torch.no_grad():
        energy = 0.5 * (v - rbm.b_v).pow(2) - hs @ rbm.b_h - v @ rbm.W @ hs.T
        expected = -torch.logsumexp(-energy, dim=1)
        assert torch.allclose(rbm.free_energy(v), expected, atol=1e-9)


def test_linear_hidden_free_energy_integrates_the_gaussian():
    rbm = random_rbm(3, 1, seed=4, hidden="gaussian")
    v = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    h = torch.linspace(-30, 30, 200001, dtype=torch.float64)
    with torch.no_grad():
        a = (v @ rbm.W + rbm.b_h)[:, :1]
        integrand = torch.exp(v @ rbm.b_v[:, None] + a * h - 0.5 * h**2)
        numeric = -torch.log(torch.trapezoid(integrand, h) / math.sqrt(2 * math.pi))
        assert torch.allclose(rbm.free_energy(v), numeric, atol=1e-6)


def test_pseudo_likelihood_is_scikit_learns_estimator():
    from sklearn.neural_network import BernoulliRBM

    rbm = random_rbm(1, 5, seed=5)  # one visible unit: both estimators flip the same bit
    sk = BernoulliRBM(n_components=5, random_state=0)
    sk.components_ = rbm.W.detach().numpy().T
    sk.intercept_visible_ = rbm.b_v.detach().numpy()
    sk.intercept_hidden_ = rbm.b_h.detach().numpy()
    sk.n_features_in_ = 1
    x = np.array([[0.0], [1.0], [0.25]])
    ours = rbm.pseudo_likelihood(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours, sk.score_samples(x), rtol=1e-10)
    wide = random_rbm(6, 4, seed=6)
    xw = torch.rand(5, 6, dtype=torch.float64)
    sk_fe = BernoulliRBM(n_components=4)
    sk_fe.components_ = wide.W.detach().numpy().T
    sk_fe.intercept_visible_ = wide.b_v.detach().numpy()
    sk_fe.intercept_hidden_ = wide.b_h.detach().numpy()
    np.testing.assert_allclose(
        wide.free_energy(xw).detach().numpy(), sk_fe._free_energy(xw.numpy()), rtol=1e-10
    )
    # seeded: the same seed flips the same units
    assert torch.equal(wide.pseudo_likelihood(xw, seed=1), wide.pseudo_likelihood(xw, seed=1))


def test_pseudo_likelihood_needs_bernoulli_visible_units():
    rbm = RBM(input_shape=(4,), latent_dim=2, visible="gaussian")
    with pytest.raises(ConfigError, match="pseudo_likelihood .* needs visible='bernoulli'"):
        rbm.pseudo_likelihood(torch.zeros(2, 4))
    # pixel counts 0..16 gave a number (-1290) where training clips them with a warning
    with pytest.raises(
        DataError, match=r"needs visible values in \[0, 1\]; got values in \[0, 16\]"
    ):
        RBM(input_shape=(4,), latent_dim=2).pseudo_likelihood(torch.tensor([[0.0, 16, 3, 1]]))
    # test rows min-max scaled by the training rows pass a little beyond 1: clipped, as
    # training and serving do
    with pytest.warns(DataRangeWarning, match="clipping them to"):
        near = RBM(input_shape=(4,), latent_dim=2).pseudo_likelihood(torch.tensor([[0, 1.2, 1, 0]]))
    assert torch.isfinite(near).all()


# -- training -------------------------------------------------------------------------
def test_rbm_matches_or_beats_scikit_learn_on_digits(digits, one_thread):
    """Same hidden size, batch size, learning rate and epochs as BernoulliRBM; the
    rest aecore's defaults (CD-1, momentum, weight decay). Mean pseudo-likelihood of
    the test split over 5 random flips, for both."""
    from sklearn.neural_network import BernoulliRBM

    train, test = digits
    hidden, batch, lr, epochs = 64, 10, 0.1, 10
    sk_scores = []
    for seed in range(2):
        sk = BernoulliRBM(
            n_components=hidden,
            batch_size=batch,
            learning_rate=lr,
            n_iter=epochs,
            random_state=seed,
        ).fit(train)
        sk_scores += [sk.score_samples(test).mean() for _ in range(5)]
    ours = []
    x = torch.as_tensor(test)
    for seed in range(2):
        torch.manual_seed(seed)
        rbm = RBM(input_shape=(64,), latent_dim=hidden, lr=lr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonBinaryDataWarning)
            Trainer(epochs=epochs, batch_size=batch, seed=seed, progress=False).fit(rbm, train)
        ours += [float(rbm.pseudo_likelihood(x, seed=s).mean()) for s in range(5)]
    assert np.mean(ours) >= np.mean(sk_scores), (np.mean(ours), np.mean(sk_scores))


def test_persistent_cd_with_its_defaults_does_not_collapse(digits, one_thread):
    # PCD at momentum 0.9 (the demo's recipe, lr 0.05) collapsed to the mean digit:
    # reconstruction 0.078 against 0.015 for CD-1, hidden units that ignore the data
    train, test = digits
    x = torch.as_tensor(test)
    torch.manual_seed(0)
    rbm = RBM(input_shape=(64,), latent_dim=32, persistent=True, chains=100, lr=0.05,
              probabilities=True)  # fmt: skip
    assert rbm.momentum == 0.5 and RBM(input_shape=(64,), latent_dim=32).momentum == 0.9
    Trainer(epochs=30, batch_size=32, seed=0, progress=False).fit(rbm, train)
    with torch.no_grad():
        assert float((rbm(x) - x).pow(2).mean()) < 0.04
        assert float(rbm.encode(x).std(0).mean()) > 0.15  # the hidden units follow the data


@pytest.mark.parametrize("hparams", [{}, {"persistent": True, "chains": 16}, {"k": 3}])
def test_training_lowers_reconstruction_error_and_keeps_state_in_buffers(digits, hparams):
    train, _ = digits
    torch.manual_seed(0)
    rbm = RBM(input_shape=(64,), latent_dim=32, **hparams)
    x = torch.as_tensor(train)
    before = float(rbm.loss(x)["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonBinaryDataWarning)
        history = Trainer(epochs=3, batch_size=32, seed=0, progress=False, val_fraction=0.0).fit(
            rbm, train
        )
    assert float(rbm.loss(x)["loss"]) < before
    assert len(history.metric("train_loss")) == 3
    assert int(rbm.updates) == 3 * math.ceil(len(train) / 32)
    buffers = dict(rbm.named_buffers())
    assert {"velocity_W", "velocity_b_v", "velocity_b_h", "chain", "updates"} <= set(buffers)
    if rbm.persistent:
        assert tuple(rbm.chain.shape) == (16, 32) and bool(rbm.chain_started)


def test_momentum_schedule_and_weight_decay():
    torch.manual_seed(0)
    rbm = RBM(input_shape=(4,), latent_dim=3, momentum_warmup=1, weight_decay=0.0, lr=0.5)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 4)
    rbm.train_step(x)
    first = rbm.velocity_W.clone()
    W_before = rbm.W.clone()
    rbm.train_step(x)
    # the second update uses momentum 0.9: velocity = 0.9 * first + lr * dW
    grad = (rbm.velocity_W - 0.9 * first) / 0.5
    assert torch.allclose(rbm.W, W_before + rbm.velocity_W)
    assert grad.abs().max() < 1.0  # a CD statistic, not a stale velocity
    # weight decay pulls the weights towards zero when the data says nothing
    decay = RBM(
        input_shape=(4,), latent_dim=3, weight_decay=0.5, lr=0.1, momentum=0.0, initial_momentum=0.0
    )
    with torch.no_grad():
        decay.W.fill_(1.0)
    norms = []
    for _ in range(3):
        norms.append(float(decay.W.norm()))
        decay.train_step(torch.zeros(8, 4))
    assert norms[0] > norms[1] > norms[2]


@pytest.mark.parametrize("persistent", [False, True])
def test_a_refused_step_changes_nothing(persistent):
    # a NaN statistic (0 * inf in the positive phase) refuses the whole step: weights,
    # velocities, the PCD chain and the update count stay as they were
    from aecore.errors import TrainingError

    torch.manual_seed(0)
    rbm = RBM(input_shape=(4,), latent_dim=3, persistent=persistent, chains=2 if persistent else 64)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    rbm.train_step(x)
    with torch.no_grad():
        rbm.W[0, 0] = math.inf
    before = {k: v.clone() for k, v in rbm.state_dict().items()}
    with pytest.raises(TrainingError, match="non-finite CD statistics after 1 updates"):
        rbm.train_step(x)
    for k, v in rbm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_is_exact(digits, tmp_path):
    train, _ = digits
    data = train[:256]

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        rbm = RBM(input_shape=(64,), latent_dim=16, persistent=True, chains=8, momentum_warmup=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonBinaryDataWarning)
            Trainer(
                epochs=epochs, batch_size=32, seed=3, out_dir=out, resume=resume, progress=False
            ).fit(rbm, data)
        return rbm

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_gaussian_visible_rbm_learns_standardised_data(one_thread):
    p = prepare("digits", normalize="standardize", seed=0)
    train = p.view("train").to_numpy()
    torch.manual_seed(0)
    rbm = RBM(input_shape=(64,), latent_dim=48, visible="gaussian")
    assert rbm.lr == 0.01  # the guide's smaller rate for Gaussian units
    x = torch.as_tensor(train)
    before = float(rbm.loss(x)["loss"])
    Trainer(epochs=5, batch_size=32, seed=0, progress=False).fit(rbm, train)
    assert float(rbm.loss(x)["loss"]) < 0.6 * before


def test_sample_is_seeded_and_in_range():
    torch.manual_seed(0)
    rbm = RBM(input_shape=(1, 4, 4), latent_dim=6)
    a = rbm.sample(5, steps=20, seed=1)
    assert a.shape == (5, 1, 4, 4)
    assert torch.equal(a, rbm.sample(5, steps=20, seed=1))
    assert ((a >= 0) & (a <= 1)).all()
    linear = RBM(input_shape=(6,), latent_dim=2, hidden="gaussian").sample(3, steps=5, seed=0)
    assert linear.shape == (3, 6) and torch.isfinite(linear).all()


def test_encode_decode_are_hidden_and_visible_means():
    rbm = random_rbm(5, 3, seed=7).float()
    x = torch.rand(4, 5)
    with torch.no_grad():
        h = rbm.encode(x)
        assert torch.allclose(h, torch.sigmoid(x @ rbm.W + rbm.b_h))
        assert torch.allclose(rbm.decode(h), torch.sigmoid(h @ rbm.W.T + rbm.b_v))
        assert torch.allclose(rbm(x), rbm.decode(h))


# -- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"k": 0}, r"k must be an int in \[1, 10000\]; got 0"),
        ({"k": 1.5}, r"k must be an int in \[1, 10000\]; got 1.5"),
        ({"k": 20000}, r"k must be an int in \[1, 10000\]; got 20000"),
        ({"visible": "binary"}, r"visible must be one of 'bernoulli', 'gaussian'; got 'binary'"),
        ({"visible": "gaussian", "hidden": "gaussian"}, r"no normalisable distribution"),
        ({"lr": 0}, r"lr must be a number in \(0, inf\); got 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), or 'auto'; got 1.0"),
        ({"persistent": "yes"}, r"persistent must be true or false; got 'yes'"),
        ({"chains": 0}, r"chains must be an int in \[1, inf\]; got 0"),
    ],
)
def test_bad_hyperparameters_are_named(hparams, message):
    with pytest.raises(ConfigError, match=message):
        RBM(input_shape=(4,), latent_dim=2, **hparams)


def test_non_binary_data_warns_once_and_says_what_it_does():
    rbm = RBM(input_shape=(3,), latent_dim=2)
    with pytest.warns(NonBinaryDataWarning, match="using them as the probabilities") as record:
        rbm.train_step(torch.tensor([[0.5, 1.0, 0.0]]))
        rbm.train_step(torch.tensor([[0.25, 1.0, 0.0]]))
    assert len([w for w in record if w.category is NonBinaryDataWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RBM(input_shape=(3,), latent_dim=2).train_step(torch.tensor([[0.0, 1.0, 1.0]]))


def test_out_of_range_data_is_clipped_with_a_warning():
    torch.manual_seed(0)
    rbm = RBM(input_shape=(2,), latent_dim=2)
    clipped = RBM(input_shape=(2,), latent_dim=2)
    clipped.load_state_dict(rbm.state_dict())
    torch.manual_seed(1)
    with pytest.warns(DataRangeWarning, match=r"values in \[-1, 3\]: clipping them to \[0, 1\]"):
        rbm.train_step(torch.tensor([[-1.0, 3.0]]))
    torch.manual_seed(1)
    clipped.train_step(torch.tensor([[0.0, 1.0]]))
    assert torch.equal(rbm.W, clipped.W)


def test_strict_makes_non_binary_data_an_error():
    rbm = RBM(input_shape=(2,), latent_dim=2, strict=True)
    with pytest.raises(DataError, match=r"non-binary values in \[0, 1\]; binarise the data"):
        rbm.train_step(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(DataError, match=r"needs data in \[0, 1\]; got values in \[0, 2\]"):
        rbm.train_step(torch.tensor([[0.0, 2.0]]))


def test_probabilities_accepts_grey_values_quietly_but_still_clips_out_of_range():
    rbm = RBM(input_shape=(2,), latent_dim=2, probabilities=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rbm.train_step(torch.tensor([[0.5, 1.0]]))
    with pytest.warns(DataRangeWarning, match="clipping them to"):
        rbm.train_step(torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ConfigError, match="strict=True makes non-binary data an error"):
        RBM(input_shape=(2,), latent_dim=2, probabilities=True, strict=True)


def test_the_trainer_checks_in_memory_data_once_not_every_batch(monkeypatch):
    """Through Trainer.fit the RBM's data checks run once over the training rows, and the
    steps skip them; what they decide (warn, clip, refuse) is unchanged."""
    calls = []  # per-batch checks (the data-dependent start, on 200 rows, aside)
    original = RBM._visible_data
    monkeypatch.setattr(
        RBM,
        "_visible_data",
        lambda self, x: (len(x) <= 16 and calls.append(len(x))) or original(self, x),
    )
    binary = (torch.rand(200, 6, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    fit = Trainer(epochs=2, batch_size=16, val_fraction=0.0, progress=False).fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(RBM(input_shape=(6,), latent_dim=3), binary)
    assert calls == []
    # grey values: one warning for the whole run, from the one check
    with pytest.warns(NonBinaryDataWarning) as record:
        fit(RBM(input_shape=(6,), latent_dim=3), binary * 0.5)
    assert len([w for w in record if w.category is NonBinaryDataWarning]) == 1 and calls == []
    strict = RBM(input_shape=(6,), latent_dim=3, strict=True)
    before = strict.W.detach().clone()
    with pytest.raises(DataError, match="non-binary values"):
        fit(strict, binary * 0.5)
    assert torch.equal(strict.W, before)
    # out of range: every batch is still clipped as it comes, with the warning
    with pytest.warns(DataRangeWarning, match="clipping them to"):
        fit(RBM(input_shape=(6,), latent_dim=3), binary * 2)
    assert len(calls) == 2 * 13


def test_demo_figures(tmp_path):
    p = prepare("digits", seed=0)
    torch.manual_seed(0)
    rbm = RBM(input_shape=(64,), latent_dim=16)
    figures = rbm.demo_figures(p, tmp_path)
    assert [path.name for _, path in figures] == ["samples.png", "filters.png"]
    assert all(path.stat().st_size > 0 for _, path in figures)


def test_a_momentum_given_to_train_step_is_checked_as_the_constructors_are():
    # momentum=1.5 ran 60 steps to |W| 3.5e9 with a normal-looking loss
    rbm = RBM(input_shape=(4,), latent_dim=3, probabilities=True)
    with pytest.raises(ConfigError, match=r"momentum must be a number in \[0, 1\)"):
        rbm.train_step(torch.rand(8, 4), momentum=1.5)


def test_filters_of_image_inputs_are_drawn_in_the_images_shape(tmp_path, monkeypatch):
    # 64 weights of a (1, 4, 16) image were drawn as scrambled 8x8 squares
    from aecore import plots

    drawn = []
    monkeypatch.setattr(plots, "filter_grid", lambda w, path, *a: drawn.append(w.shape) or path)
    rbm = RBM(input_shape=(1, 4, 16), latent_dim=5)
    rbm.demo_figures(None, tmp_path)
    assert drawn == [(5, 1, 4, 16)] and plots.as_images(np.zeros(drawn[0])).shape == (5, 4, 16)


def test_estimators_scaling_pixel_counts_themselves_do_not_warn_of_grey_values():
    # normalize="auto" min-max scales counts 0..16 into grey levels, and grey levels a user
    # hands an estimator are meant as such: the warning is for the model's own API
    from aecore.anomaly import AnomalyDetector

    counts = np.random.default_rng(0).integers(0, 17, size=(60, 16)).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector = AnomalyDetector("rbm", epochs=1, random_state=0).fit(counts)
    assert detector.model_.probabilities
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnomalyDetector("rbm", epochs=1, random_state=0).fit(counts / 16)
    with pytest.warns(NonBinaryDataWarning):
        Trainer(epochs=1, progress=False).fit(RBM(input_shape=(16,), latent_dim=4), counts / 16)
    # a choice of the user's wins
    strict = AnomalyDetector("rbm", epochs=1, random_state=0, strict=True)
    with pytest.raises(DataError, match="binary"):
        strict.fit(counts)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_trainer_step_reads_back_one_number(step_ops, step_reads, persistent):
    # whether the step applied (a refused one must stop the run at once); not the update
    # count for the momentum schedule nor whether the PCD chain started, which the model
    # keeps on the host as it changes them
    pytest.importorskip("aecore._C")
    schema = torch.ops.aecore.cd_update_.default._schema
    at = [a.name for a in schema.arguments].index("momentum")

    def momenta():
        return [args[at] for op, args in step_ops if op == "cd_update_"]

    binary = (torch.rand(50, 6, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    rbm = RBM(input_shape=(6,), latent_dim=3, persistent=persistent, momentum=0.9,
              momentum_warmup=3)  # fmt: skip
    fit = Trainer(epochs=1, batch_size=10, val_fraction=0.0, progress=False, seed=0).fit
    fit(rbm, binary)
    assert momenta() == [0.5, 0.5, 0.5, 0.9, 0.9]
    # five steps; the first reads the count and the chain's flag once
    assert len(step_reads()) == 5 + 1 + persistent
    # a loaded model (a new version of its buffers) reads its count again
    twin = RBM(input_shape=(6,), latent_dim=3, persistent=persistent, momentum=0.9,
               momentum_warmup=3)  # fmt: skip
    with torch.no_grad():
        rbm.updates.fill_(1)
    twin.load_state_dict(rbm.state_dict())
    step_ops.clear()
    fit(twin, binary)
    assert momenta() == [0.5, 0.5, 0.9, 0.9, 0.9]
    assert len(step_reads()) == 5 + 1 + persistent
