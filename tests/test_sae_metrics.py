"""SAE metrics against known answers, their streaming accumulators against the one-shot
formulas, and ``sae_metrics`` on a linear model whose dictionary is the truth."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aecore.data import prepare
from aecore.data.superposition import Superposition
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.sae.metrics import (
    DeadLatents,
    MeanCorrelation,
    VarianceUnexplained,
    explained_variance,
    fvu,
    l0,
    max_cosine_similarity,
    mcc,
    mmcs,
    sae_metrics,
    shrinkage,
)

TRUTH = Superposition(d=16, n_features=12, p=0.1, seed=4)


def numpy_fvu(x, x_hat):
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def splits(n):
    """Ways to cut n rows into consecutive batches: the cut points."""
    return st.lists(st.integers(1, max(1, n - 1)), max_size=4).map(lambda c: sorted(set(c)))


def in_batches(n, cuts):
    bounds = [0, *(c for c in cuts if 0 < c < n), n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _feed_in_batches(acc, parts, *arrays):
    for part in parts:
        acc.update(*(a[part] for a in arrays))
    return acc


# -- reconstruction ---------------------------------------------------------------------------
def test_fvu_of_known_reconstructions():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 8)).astype(np.float32)
    assert fvu(x, x) == 0.0 and explained_variance(x, x) == 1.0
    mean = np.broadcast_to(x.mean(0), x.shape)
    assert fvu(x, mean) == pytest.approx(1.0, abs=1e-6)
    noisy = x + np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    assert fvu(torch.from_numpy(x), torch.from_numpy(noisy), batch_size=37) == pytest.approx(
        numpy_fvu(x, noisy), rel=1e-6
    )
    assert explained_variance(x, noisy) == pytest.approx(1 - numpy_fvu(x, noisy), rel=1e-6)
    assert math.isnan(fvu(np.ones((4, 3)), np.zeros((4, 3))))  # no variance: undefined


@given(
    hnp.arrays(
        np.float64, st.tuples(st.integers(2, 40), st.integers(1, 5)), elements=st.floats(-10, 10)
    ),
    st.floats(-1e4, 1e4),
    st.data(),
)
def test_streamed_fvu_is_the_one_shot_formula(x, offset, data):
    x = x + offset  # a large mean must not cancel the variance away
    x_hat = x[::-1] * 0.5
    if ((x - x.mean(0)) ** 2).sum() < 1e-6:
        return
    acc = VarianceUnexplained()
    for rows in in_batches(len(x), data.draw(splits(len(x)))):
        acc.update(x[rows], x_hat[rows])
    assert acc.rows == len(x)
    assert acc.result() == pytest.approx(numpy_fvu(x, x_hat), rel=1e-7, abs=1e-9)


def test_shape_errors_name_the_arguments():
    with pytest.raises(
        ShapeError, match=r"x, x_hat: expected equal shapes; got \(3, 2\), \(3, 4\)"
    ):
        fvu(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ShapeError, match=r"x, x_hat: expected the same rows; got \[3, 5\]"):
        fvu(np.zeros((3, 2)), np.zeros((5, 2)))
    with pytest.raises(ShapeError, match="codes: expected 2-d rows"):
        l0(np.zeros(5))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer; got 0"):
        fvu(np.zeros((3, 2)), np.zeros((3, 2)), batch_size=0)


# -- sparsity -----------------------------------------------------------------------------
def test_l0_counts_nonzero_latents_of_either_sign():
    z = torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.5, 0.0, 0.1]])
    assert l0(z) == pytest.approx(5 / 3)
    assert l0(z, batch_size=2) == pytest.approx(5 / 3)
    assert math.isnan(l0(np.zeros((0, 4))))


def test_dead_latents_over_a_window():
    dead = DeadLatents()
    dead.update(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
    dead.update(np.array([[0.5, 0.0, 0.0, 0.0]]))
    assert dead.rows == 3 and dead.fire_counts.tolist() == [2, 0, 0, 1]
    assert dead.dead == 2 and dead.dead_fraction == 0.5 and dead.l0 == pytest.approx(1.0)
    np.testing.assert_allclose(dead.density.numpy(), [2 / 3, 0, 0, 1 / 3])
    with pytest.raises(ShapeError, match="expected 4 latents as before; got 3"):
        dead.update(torch.zeros(2, 3))


# -- shrinkage ----------------------------------------------------------------------------
def test_shrinkage_is_the_mean_norm_ratio():
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert shrinkage(x, x) == pytest.approx(1.0)
    assert shrinkage(x, 0.5 * x, batch_size=33) == pytest.approx(0.5)
    ratios = np.linalg.norm(0.5 * x + 0.1, axis=1) / np.linalg.norm(x, axis=1)
    assert shrinkage(x, 0.5 * x + 0.1) == pytest.approx(ratios.mean())
    x[3] = 0  # a row with no norm has no ratio
    assert shrinkage(x, 0.5 * x + (np.arange(200) == 3)[:, None]) == pytest.approx(0.5)


def test_shrinkage_about_a_center_measures_what_the_latents_write():
    rng = np.random.default_rng(1)
    center = np.full(6, 10.0)
    part = rng.normal(size=(100, 6))
    x, x_hat = center + part, center + 0.5 * part
    assert shrinkage(x, x_hat, center=center) == pytest.approx(0.5)
    assert shrinkage(x, x_hat) > 0.9  # about 0, the large mean hides it
    with pytest.raises(ShapeError, match="center: expected 6 values; got 5"):
        shrinkage(x, x_hat, center=np.zeros(5))


# -- dictionary recovery ----------------------------------------------------------------------
def permuted_rescaled(a, seed=0):
    """Columns of ``a`` (or rows, transposed) permuted and scaled by positive factors."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(a.shape[1])
    return a[:, order] * rng.uniform(0.2, 5.0, size=a.shape[1]).astype(a.dtype), order


def test_mmcs_of_a_permuted_rescaled_copy_is_one():
    features = Superposition(d=32, n_features=100).features()
    learned, _ = permuted_rescaled(features.T)
    assert mmcs(features, learned.T) == pytest.approx(1.0, abs=1e-6)
    extra = np.vstack([learned.T, np.random.default_rng(1).normal(size=(50, 32))])
    assert mmcs(features, extra, block=7) == pytest.approx(1.0, abs=1e-6)


def test_mmcs_of_random_dictionaries_is_well_below_one():
    features = Superposition(d=64, n_features=200).features()
    random = np.random.default_rng(5).normal(size=(400, 64))
    assert mmcs(features, random) < 0.6
    assert mmcs(features, -features) < 0.5  # signed: opposite directions are not found
    best = max_cosine_similarity(features, np.vstack([features[:10], np.zeros((3, 64))]))
    assert best.shape == (200,) and torch.all(best[:10] > 0.999)


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 9))
def test_mmcs_ignores_row_order_scale_and_blocks(seed, n_learned, block):
    rng = np.random.default_rng(seed)
    true, learned = rng.normal(size=(13, 5)), rng.normal(size=(n_learned, 5))
    scaled = learned[rng.permutation(n_learned)] * rng.uniform(0.01, 100, size=(n_learned, 1))
    cos = (true / np.linalg.norm(true, axis=1, keepdims=True)) @ (
        learned / np.linalg.norm(learned, axis=1, keepdims=True)
    ).T
    assert mmcs(true, learned) == pytest.approx(cos.max(1).mean(), abs=1e-12)
    assert mmcs(true, scaled, block=block) == pytest.approx(mmcs(true, learned), abs=1e-12)


def test_mmcs_shape_errors():
    with pytest.raises(ShapeError, match="rows of the same dimension; got 5 and 4"):
        mmcs(np.ones((3, 5)), np.ones((3, 4)))
    with pytest.raises(ShapeError, match="the dictionary has no rows"):
        mmcs(np.ones((3, 5)), np.ones((0, 5)))


# -- code recovery --------------------------------------------------------------------------
def test_mcc_of_permuted_rescaled_true_activations_is_one():
    acts = Superposition(d=8, n_features=40, p=0.05).sample(20000)[1]
    codes, order = permuted_rescaled(acts)
    assert mcc(acts, codes, batch_size=3001) == pytest.approx(1.0, abs=1e-5)
    noise = np.random.default_rng(2).random((20000, 25)).astype(np.float32)
    acc = MeanCorrelation()
    acc.update(acts, np.hstack([noise, codes]))
    true_index, latent_index, corr = acc.matching()
    np.testing.assert_array_equal(latent_index - 25, np.argsort(order)[true_index])
    assert corr.min() > 1 - 1e-5
    assert mcc(acts, np.random.default_rng(3).random((20000, 40))) < 0.1


@pytest.mark.parametrize("still", [0.0, 0.1, -7.3e5])
def test_mcc_gives_no_credit_for_columns_that_never_vary(still):
    t = np.random.default_rng(0).random((301, 3))
    codes = np.hstack([t[:, :2], np.full((301, 1), still)])
    acc = _feed_in_batches(MeanCorrelation(), [slice(0, 100), slice(100, 301)], t, codes)
    assert acc.correlations()[:, 2].abs().max() == 0
    assert acc.result() == pytest.approx(2 / 3)
    constant = np.full((301, 2), still)
    assert math.isnan(fvu(constant, constant + 1, batch_size=100))


@given(
    st.integers(0, 2**31 - 1),
    st.integers(3, 60),
    st.integers(1, 6),
    st.integers(1, 8),
    st.floats(-1e3, 1e3),
    st.data(),
)
def test_streamed_correlations_are_the_one_shot_pearson(seed, rows, n_true, n_codes, offset, data):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(rows, n_true)) * (rng.random((rows, n_true)) < 0.5)
    z = rng.normal(size=(rows, n_codes)) + offset + t[:, :1] * rng.normal()
    whole = MeanCorrelation()
    whole.update(t, z)
    streamed = MeanCorrelation()
    for part in in_batches(rows, data.draw(splits(rows))):
        streamed.update(torch.from_numpy(t[part]), z[part])
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.corrcoef(t.T, z.T)[:n_true, n_true:]
    still = np.ptp(t, axis=0)[:, None] * np.ptp(z, axis=0)[None, :] == 0
    expected[still] = 0
    for acc in (whole, streamed):
        np.testing.assert_allclose(acc.correlations().numpy(), expected, atol=1e-7)
    assert streamed.result() == pytest.approx(whole.result(), abs=1e-9)


# -- sae_metrics ----------------------------------------------------------------------------
class LinearSAE(torch.nn.Module):
    """z = (x - b_dec) @ pinv(W_dec), values under 1e-4 (rounding) set to 0: with W_dec
    the true features (fewer than the dimensions) it recovers the true activations."""

    def __init__(self, dictionary, extra_latents=0):
        super().__init__()
        w = torch.as_tensor(dictionary, dtype=torch.float32)
        self.W_dec = torch.nn.Parameter(torch.cat([w, torch.zeros(extra_latents, w.shape[1])]))
        self.b_dec = torch.nn.Parameter(torch.zeros(w.shape[1]))

    def encode(self, x):
        z = (x - self.b_dec) @ torch.linalg.pinv(self.W_dec)
        return z * (z > 1e-4)

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


def test_sae_metrics_of_the_true_dictionary():
    x = TRUTH.sample(3000)[0]
    model = LinearSAE(TRUTH.features()).train()
    out = sae_metrics(model, x, truth=TRUTH, batch_size=700)
    assert model.training  # its mode is restored
    assert out["fvu"] == pytest.approx(0.0, abs=1e-8)
    assert out["explained_variance"] == pytest.approx(1.0, abs=1e-8)
    assert out["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert out["mcc"] == pytest.approx(1.0, abs=1e-5)
    assert out["l0"] == pytest.approx(TRUTH.n_features * TRUTH.p, rel=0.05)
    assert out["dead"] == 0 and out["dead_fraction"] == 0.0
    assert out["shrinkage"] == pytest.approx(1.0, abs=1e-4)
    assert out["shrinkage_centered"] == pytest.approx(1.0, abs=1e-4)
    holed = torch.as_tensor(x).clone()
    holed[1234, 3] = float("nan")  # in the second batch
    with pytest.raises(DataError, match="NaN or infinite values at row 1234"):
        sae_metrics(model, holed, batch_size=700)
    # a tensor of the same rows (whose ``indices`` is a sparse-tensor method, not rows)
    as_tensor = sae_metrics(model, torch.as_tensor(x), truth=TRUTH, batch_size=700)
    assert as_tensor["mcc"] == pytest.approx(out["mcc"], abs=1e-6)


def test_sae_metrics_on_a_prepared_split_and_with_dead_latents():
    prepared = prepare("superposition:2000,d=16,n=12,p=0.1,seed=4", normalize="none")
    test = prepared.view("test")  # x.indices: its rows' positions in the stream
    model = LinearSAE(TRUTH.features(), extra_latents=4)
    out = sae_metrics(model, test, truth=TRUTH)
    assert out["mcc"] == pytest.approx(1.0, abs=1e-5) and out["mmcs"] == pytest.approx(
        1.0, abs=1e-6
    )
    assert out["dead"] == 4 and out["dead_fraction"] == pytest.approx(4 / 16)
    # the wrong rows of the stream: the codes no longer go with the true activations
    wrong = sae_metrics(model, test, truth=TRUTH, rows=np.arange(len(test)))
    assert wrong["mcc"] < 0.2 and wrong["fvu"] == pytest.approx(out["fvu"])


def test_sae_metrics_finds_or_takes_the_dictionary():
    class Plain:  # not a module: no parameters, no dictionary of its own
        def encode(self, x):
            return torch.relu(x @ torch.linalg.pinv(torch.from_numpy(TRUTH.features())))

        def decode(self, z):
            return z @ torch.from_numpy(TRUTH.features())

    x = TRUTH.sample(500)[0]
    without = sae_metrics(Plain(), x)
    assert "mmcs" not in without and "shrinkage_centered" not in without
    with pytest.raises(ConfigError, match="Plain has no dictionary"):
        sae_metrics(Plain(), x, truth=TRUTH)
    negated = -TRUTH.features()
    assert sae_metrics(Plain(), x, truth=TRUTH, dictionary=negated)["mmcs"] < 0.5
    Plain.dictionary = lambda self: TRUTH.features()
    assert sae_metrics(Plain(), x, truth=TRUTH)["mmcs"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ShapeError, match=r"dictionary: expected \(n_latents, 16\)"):
        sae_metrics(Plain(), x, truth=TRUTH, dictionary=np.zeros((16, 12)))
    with pytest.raises(ShapeError, match="rows: expected 500 stream positions"):
        sae_metrics(Plain(), x, truth=TRUTH, rows=np.arange(10))
