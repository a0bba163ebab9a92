"""aecore.sklearn.AutoencoderTransformer: scikit-learn's own estimator checks for each
built-in vector model, hparams through get_params/set_params/clone, Pipeline and
GridSearchCV, reproducibility, units, outlier flags, quality on digits, bad inputs."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from model_settings import small_hparams
from sklearn.base import clone
from sklearn.datasets import load_digits, load_iris
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

import aecore
from aecore import registry
from aecore.base import Autoencoder
from aecore.errors import ConfigError, DataError, RegistryError, ShapeError
from aecore.sklearn import AutoencoderTransformer, model_hparam_names

DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
RNG = np.random.default_rng(0)
TABLE = RNG.normal(size=(120, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + [0.0, 500.0, -2.0, 7.0, 1.0]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # these nets are tiny: on 2 shared cores a second intra-op thread only adds
    # contention (a digits fit ran ~5x slower with 2 threads under load)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(model="ae", **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("random_state", 0)
    return AutoencoderTransformer(model, **kw)


# -- scikit-learn's estimator checks, for every registered model that takes vectors -----
# (minmax: the vae's Bernoulli decoder and the RBM's Bernoulli units need [0, 1] inputs)
@parametrize_with_checks(
    [
        small(name, normalize="minmax", **small_hparams(name))
        for name in aecore.list_models(requires="vector")
    ],
    expected_failed_checks=lambda est: {},
)
# check data is not binary: the RBM rightly warns that it reads it as probabilities
@pytest.mark.filterwarnings("ignore:RBM.* got non-binary values")
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_tags_declare_a_transformer_and_outlier_detector():
    tags = AutoencoderTransformer().__sklearn_tags__()
    assert tags.estimator_type == "outlier_detector"
    assert tags.transformer_tags.preserves_dtype == ["float64", "float32"]
    assert not tags.input_tags.allow_nan and not tags.input_tags.sparse
    assert not tags.non_deterministic and tags.requires_fit


# -- hyperparameters through get_params / set_params / clone ------------------------
def test_hparams_are_params_and_survive_clone():
    est = AutoencoderTransformer(latent_dim=3, hidden=[16, 4], dropout=0.1)
    params = est.get_params()
    assert params["hidden"] == [16, 4] and params["dropout"] == 0.1
    assert params["latent_dim"] == 3 and params["model"] == "ae"
    twin = clone(est)
    assert twin.get_params() == params and twin is not est
    assert "hidden=[16, 4]" in repr(est)

    twin.set_params(hidden=[8], latent_dim=2)
    assert twin.get_params()["hidden"] == [8] and twin.get_params()["latent_dim"] == 2
    assert est.get_params()["hidden"] == [16, 4]  # the original is untouched
    fitted = twin.fit(TABLE)
    assert fitted.model_.hidden == [8] and fitted.model_.latent_dim == 2
    assert fitted.model_.dropout == 0.1


ae_hparams = st.fixed_dictionaries(
    {},
    optional={
        "hidden": st.lists(st.integers(1, 512), max_size=3),
        "dropout": st.floats(0, 0.9),
        "activation": st.sampled_from(["relu", "tanh", "gelu"]),
        "linear_path": st.booleans(),
        "init": st.sampled_from(["pca", "random"]),
    },
)


@given(first=ae_hparams, second=ae_hparams, latent_dim=st.integers(1, 32))
def test_any_hparams_round_trip_through_params_and_clone(first, second, latent_dim):
    est = AutoencoderTransformer(latent_dim=latent_dim, **first)
    assert (
        clone(est).get_params()
        == est.get_params()
        == {
            **AutoencoderTransformer().get_params(),
            "latent_dim": latent_dim,
            **first,
        }
    )
    est.set_params(**second)
    assert est.get_params() == {
        **AutoencoderTransformer().get_params(),
        "latent_dim": latent_dim,
        **first,
        **second,
    }
    rebuilt = AutoencoderTransformer(**est.get_params())
    assert rebuilt.get_params() == est.get_params()


def test_set_params_rejects_what_the_model_does_not_take():
    est = AutoencoderTransformer()
    with pytest.raises(ValueError, match=r"Invalid parameter 'hiden'.*'hidden'"):
        est.set_params(hiden=[8])
    with pytest.raises(ValueError, match=r"Invalid parameter 'p'"):
        est.set_params(p=0.2)  # a denoising hparam, not an ae one
    with pytest.raises(ValueError, match=r"Invalid parameter 'hidden__x'"):
        est.set_params(hidden__x=1)
    assert est.get_params() == AutoencoderTransformer().get_params()  # nothing changed
    # switching the model in the same call checks against the new model
    est.set_params(model="denoising", p=0.2, hidden=[8])
    assert est.get_params()["p"] == 0.2
    assert est.fit(TABLE[:40]).model_.p == 0.2
    # switching again drops what the new model does not take and keeps what it does:
    # a grid over models from one estimator fits every one of them
    est.set_params(model="ae")
    assert "p" not in est.get_params() and est.get_params()["hidden"] == [8]
    assert est.fit(TABLE[:40]).model_.hidden == [8]
    grid = GridSearchCV(
        AutoencoderTransformer("ae", latent_dim=2, epochs=1, random_state=0, dropout=0.1),
        {"model": ["ae", "rbm"]}, cv=2, error_score="raise",
    )  # fmt: skip
    grid.fit(TABLE[:40])
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()


def test_hparam_names_follow_kwargs_to_the_parent_model():
    ae = model_hparam_names("ae")
    assert {"hidden", "activation", "dropout"} <= ae
    assert model_hparam_names("denoising") == ae | {"corruption", "sigma", "p"}


def test_unknown_hparam_given_to_the_constructor_fails_at_fit():
    est = AutoencoderTransformer(hiden=[8])  # scikit-learn validates in fit, not init
    with pytest.raises(ConfigError, match=r"no hyperparameter 'hiden'; did you mean 'hidden'"):
        est.fit(TABLE)
    # a misspelt setting of the estimator's own: that is the one suggested
    with pytest.raises(ConfigError, match=r"'epoch' is neither a parameter of .*'epochs'\?"):
        AutoencoderTransformer(epoch=3).fit(TABLE)
    with pytest.raises(ConfigError, match=r"AnomalyDetector .*did you mean 'contamination'"):
        aecore.AnomalyDetector(contamnation=0.2).fit(TABLE)


class _SelfUpdating(Autoencoder):
    """A model with its own update rule and learning rate, like the RBM."""

    uses_optimizer = False

    def __init__(self, *, input_shape, latent_dim, lr=0.5):
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.lr = lr
        self.enc = nn.Linear(self.input_size, latent_dim)
        self.dec = nn.Linear(latent_dim, self.input_size)

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z)

    def loss(self, x):
        recon = (self(x) - x).pow(2).mean()
        return {"loss": recon}

    def train_step(self, x):
        with torch.enable_grad():
            terms = self.loss(x)
            self.zero_grad()
            terms["loss"].backward()
        with torch.no_grad():
            for p in self.parameters():
                p -= self.lr * p.grad
        return {k: v.detach() for k, v in terms.items()}

    def get_config(self):
        return {**self.base_config(), "lr": self.lr}


@pytest.fixture
def self_updating():
    registry.register("sklearn-test-selfupdating", _SelfUpdating)
    yield "sklearn-test-selfupdating"
    registry.unregister("sklearn-test-selfupdating")


def test_lr_goes_to_a_self_updating_models_own_lr(self_updating):
    assert model_hparam_names(self_updating) == {"lr"}
    assert small(self_updating, lr=0.01).fit(TABLE).model_.lr == 0.01
    assert small(self_updating).fit(TABLE).model_.lr == 0.5  # None: the model's default


# -- fitting: reproducible, seeded, leaves the caller's RNG alone --------------------
def test_fixed_random_state_gives_identical_fits_and_seeds_differ():
    a = small(hidden=[8], dropout=0.2, epochs=3).fit(TABLE).transform(TABLE)
    b = small(hidden=[8], dropout=0.2, epochs=3).fit(TABLE).transform(TABLE)
    c = small(hidden=[8], dropout=0.2, epochs=3, random_state=1).fit(TABLE).transform(TABLE)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    d = small(hidden=[8], random_state=np.random.RandomState(3)).fit(TABLE).transform(TABLE)
    assert d.shape == (len(TABLE), 2)


def test_fit_does_not_move_the_global_torch_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    small(hidden=[8]).fit(TABLE)
    assert torch.equal(torch.rand(3), expected)


def test_validation_fraction_early_stops_and_records_history():
    est = small(hidden=[8], epochs=40, validation_fraction=0.25, patience=2, lr=0.05)
    est.fit(TABLE)
    assert "val_loss" in est.history_.epochs[0]
    assert est.history_.stopped_early and est.n_iter_ == len(est.history_.epochs) < 40
    # the weights kept are the best validation epoch's (epoch 0: before training)
    assert est.history_.best_val_loss <= min(e["val_loss"] for e in est.history_.epochs)


# -- what the methods return --------------------------------------------------------
def test_transform_and_inverse_transform_shapes_dtypes_and_units():
    est = small(hidden=[16], latent_dim=3, epochs=5).fit(TABLE)
    codes = est.transform(TABLE)
    assert codes.shape == (len(TABLE), 3) and codes.dtype == np.float64
    assert est.transform(TABLE.astype(np.float32)).dtype == np.float32
    assert list(est.get_feature_names_out()) == [f"autoencodertransformer{i}" for i in range(3)]

    recon = est.inverse_transform(codes)
    assert recon.shape == TABLE.shape and recon.dtype == np.float64
    # back in the data's units: column 1 lives around 500 with spread 10
    assert abs(recon[:, 1].mean() - 500) < 5
    # score_samples is minus the mean squared error of that reconstruction, measured in
    # the standardised units the model was fitted in
    norm = est.normalization_
    err = ((norm.apply(recon) - norm.apply(TABLE)) ** 2).mean(1)
    np.testing.assert_allclose(-est.score_samples(TABLE), err, rtol=1e-4, atol=1e-6)
    assert est.score(TABLE) == pytest.approx(est.score_samples(TABLE).mean())


def test_predict_flags_the_contamination_share_of_training_rows():
    est = small(hidden=[8], contamination=0.2).fit(TABLE)
    flags = est.predict(TABLE)
    assert set(np.unique(flags)) == {-1, 1}
    assert np.mean(flags == -1) == pytest.approx(0.2, abs=1 / len(TABLE))
    np.testing.assert_allclose(est.decision_function(TABLE), est.score_samples(TABLE) - est.offset_)
    # the worst-reconstructed rows are the flagged ones
    scores = est.score_samples(TABLE)
    assert scores[flags == -1].max() < scores[flags == 1].min()


def test_pickled_estimator_and_saved_model_give_the_same_codes(tmp_path):
    est = small(hidden=[8], latent_dim=2).fit(TABLE)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.transform(TABLE), est.transform(TABLE))
    # model_ is an ordinary aecore model carrying its normalisation: it saves and loads
    aecore.save(est.model_, tmp_path / "m")
    loaded = aecore.load(tmp_path / "m")
    assert loaded.normalization == est.normalization_
    x = torch.as_tensor(loaded.normalization.apply(TABLE))
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded.encode(x).numpy(), est.transform(TABLE), rtol=1e-4, atol=1e-5
        )


# -- quality on digits --------------------------------------------------------------
def digits_split():
    return train_test_split(DIGITS_X, DIGITS_Y, test_size=0.3, random_state=0)


def test_beats_pca_on_held_out_digits_and_spots_scrambled_digits():
    x_train, x_test, _, _ = digits_split()
    est = AutoencoderTransformer(latent_dim=8, epochs=10, hidden=[32], random_state=0)
    est.fit(x_train)
    # PCA at the same code size, in the same standardised units
    norm = est.normalization_
    pca = PCA(8).fit(norm.apply(x_train))
    z = norm.apply(x_test)
    pca_mse = np.mean((pca.inverse_transform(pca.transform(z)) - z) ** 2)
    ae_mse = -est.score(x_test)
    assert ae_mse < 0.9 * pca_mse  # measured about 0.45 vs 0.54

    # outliers: digits with their pixels scrambled (same intensities, no strokes)
    rng = np.random.default_rng(0)
    scrambled = np.array([rng.permutation(row) for row in x_test[:100]])
    scores = np.r_[est.score_samples(x_test), est.score_samples(scrambled)]
    normal = np.r_[np.ones(len(x_test)), np.zeros(len(scrambled))]
    assert roc_auc_score(normal, scores) > 0.98  # measured 0.9999
    assert np.mean(est.predict(scrambled) == -1) > 0.95
    assert np.mean(est.predict(x_test) == -1) < 0.2  # ~ contamination=0.1 on new digits


# -- Pipeline and GridSearchCV ------------------------------------------------------
def test_grid_search_over_latent_dim_with_the_estimators_own_score():
    x = DIGITS_X[:600]
    search = GridSearchCV(
        AutoencoderTransformer(epochs=3, hidden=[16], random_state=0),
        {"latent_dim": [1, 8]},
        cv=2,
    )
    search.fit(x)
    assert search.best_params_ == {"latent_dim": 8}  # more code, better reconstruction
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0] and np.all(scores < 0)


def test_grid_search_over_an_hparam_of_a_pipeline_step():
    x_train, x_test, y_train, y_test = digits_split()
    pipe = Pipeline(
        [
            ("ae", AutoencoderTransformer(latent_dim=16, epochs=5, random_state=0)),
            ("clf", LogisticRegression(max_iter=300)),
        ]
    )
    search = GridSearchCV(pipe, {"ae__hidden": [[4], [32]]}, cv=2)
    search.fit(x_train, y_train)
    assert [p["ae__hidden"] for p in search.cv_results_["params"]] == [[4], [32]]
    best = search.best_estimator_.named_steps["ae"]
    assert best.get_params()["hidden"] in ([4], [32])
    assert best.model_.hidden == best.get_params()["hidden"]
    assert search.score(x_test, y_test) > 0.9  # digits from 16 learned features


# -- bad inputs ---------------------------------------------------------------------
def test_unknown_model_gives_the_registry_message():
    with pytest.raises(RegistryError, match=r"unknown model 'aee'; did you mean 'ae'"):
        AutoencoderTransformer("aee").fit(TABLE)


def test_model_that_does_not_take_vectors_says_so():
    with pytest.raises(ConfigError, match=r"takes tabular rows.*'conv' takes images"):
        AutoencoderTransformer("conv").fit(TABLE)


def test_normalize_auto_follows_the_models_input_range():
    # a Bernoulli decoder takes inputs in [0, 1]: given one, data in units of its own is
    # min-max scaled
    vae = small("vae", hidden=[8], decoder="bernoulli").fit(TABLE)
    assert vae.normalization_.kind == "minmax" and vae.get_params()["normalize"] == "auto"
    far = TABLE * 3.0  # rows beyond the training range are clipped to the model's range
    assert np.isfinite(vae.transform(far)).all() and np.isfinite(vae.score_samples(far)).all()
    assert small("ae", hidden=[8]).fit(TABLE).normalization_.kind == "standardize"
    # data already in [0, 1] (pixels, say) is kept as it is: rescaling each feature to
    # its own range would blow up the ones that barely vary
    unit = (TABLE - TABLE.min(0)) / (TABLE.max(0) - TABLE.min(0)) * 0.5
    for name in ("ae", "vae"):
        assert small(name, hidden=[8]).fit(unit).normalization_.kind == "none"
    # a model's own declared default wins (an SAE's activations keep their geometry)
    sae = small("sae-topk", latent_dim=8).fit(TABLE)
    assert sae.normalization_.kind == "none"
    with pytest.raises(DataError, match=r"normalize with 'minmax'"):
        small("vae", hidden=[8], normalize="standardize").fit(TABLE)


def test_normalize_auto_does_not_depend_on_the_unit_each_feature_is_recorded_in():
    # features in units of their own (wine: hue near 1, proline near 1000) are each
    # rescaled, so recording one in grams and another from an offset changes nothing; a
    # floor at the mean scale once let proline drown the rest (one-class AUC 0.60)
    from sklearn.datasets import load_wine

    X = load_wine(return_X_y=True)[0][:60]
    units = np.ones(X.shape[1])
    units[[0, 7]] = [1000.0, 0.01]
    moved = X * units + np.arange(X.shape[1]) * 40.0
    for name in ("ae", "vae"):
        for make in (small, aecore.AnomalyDetector):
            a = make(name, hidden=[8], epochs=2, random_state=0).fit(X)
            b = make(name, hidden=[8], epochs=2, random_state=0).fit(moved)
            assert a.normalization_.scale.size == X.shape[1]
            np.testing.assert_allclose(a.score_samples(X), b.score_samples(moved), rtol=1e-4)


def test_normalize_auto_keeps_the_relative_sizes_of_features_on_one_scale():
    # pixel counts in 0..16: rescaling each pixel to its own range would weigh one that
    # is almost always dark like the strokes; centred and divided by one scale instead
    X = load_digits(return_X_y=True)[0][:200]
    ae = small("ae", hidden=[8]).fit(X).normalization_
    assert ae.kind == "standardize" and np.ptp(ae.scale) == 0 and np.ptp(ae.shift) > 0
    # a model that needs [0, 1] (Bernoulli units, asked for) gets the data min-max scaled
    # as a whole, as pixels in [0, 1] would be kept
    vae = small("vae", hidden=[8], decoder="bernoulli").fit(X).normalization_
    assert vae.kind == "minmax" and vae.scale.size == 1 and float(vae.scale[0]) == 16.0


def test_normalize_auto_gives_data_outside_0_1_gaussian_units():
    # min-max scaling for Bernoulli units clips a new row beyond the training range to
    # its edge, where an anomaly looks like the most extreme normal row (one-class wine:
    # vae 0.745, rbm 0.750 mean ROC-AUC; with Gaussian units 0.982 and 0.983; iris, on
    # one scale: vae 0.878 -> 0.997), and standardised data
    iris = load_iris(return_X_y=True)[0]
    standardised = (TABLE - TABLE.mean(0)) / TABLE.std(0)
    for data in (TABLE, iris, standardised):
        for name, key in (("vae", "decoder"), ("rbm", "visible"), ("deep", "visible")):
            fitted = small(name, **small_hparams(name)).fit(data)
            assert fitted.model_.get_config()[key] == "gaussian", (name, data.shape)
            far = data[:5] * 3.0 + 1.0  # not clipped: farther rows score as farther
            assert (fitted.score_samples(far) < fitted.score_samples(data[:5])).all()
    # data in [0, 1] and intensities from zero on one scale (pixel counts) keep them
    unit = (TABLE - TABLE.min(0)) / np.ptp(TABLE, axis=0)
    counts = load_digits(return_X_y=True)[0][:200]
    for data in (unit, counts):
        assert small("vae", hidden=[8]).fit(data).model_.decoder == "bernoulli"
    # the caller's settings win: Bernoulli-only ones keep Bernoulli units, and an RBM's
    # Gaussian hidden units (no normalisable joint with Gaussian visible ones) too
    for hparams in ({"probabilities": True}, {"strict": False}, {"hidden": "gaussian"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # grey values as probabilities
            assert small("rbm", **hparams).fit(TABLE).model_.visible == "bernoulli"
    assert small("vae", hidden=[8], decoder="bernoulli").fit(TABLE).model_.decoder == "bernoulli"
    assert small("vae", hidden=[8], decoder_std=0.5).fit(TABLE).model_.decoder == "gaussian"


@pytest.mark.parametrize("contamination", [0, 0.51, -0.1, "auto", float("nan")])
def test_contamination_outside_0_to_half_is_refused(contamination):
    with pytest.raises(ConfigError, match=r"contamination must be a number in \(0, 0.5\]"):
        small(contamination=contamination).fit(TABLE)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"normalize": "zscore"}, r"normalize must be one of 'auto', 'standardize'"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be a number in \[0, 1\)"),
        ({"patience": 0}, r"patience must be an int in \[1, inf\]"),
        ({"epochs": 0}, r"epochs must be an int in \[1, inf\]"),
        ({"lr": -1.0}, r"lr must be a number in \(0, inf\)"),
        ({"random_state": -3}, r"random_state must be an int in \[0, 4294967295\]"),
        ({"latent_dim": 0}, r"latent_dim must be a positive int"),
        ({"hidden": [0]}, r"hidden must be a list of positive ints"),
    ],
)
def test_bad_settings_are_named(params, message):
    with pytest.raises(ConfigError, match=message):
        small(**params).fit(TABLE)


def test_too_few_rows_for_a_hold_out_train_on_every_row():
    est = small(validation_fraction=0.1).fit(TABLE[:3])  # round(0.3) = 0 rows to hold out
    assert "val_loss" not in est.history_.epochs[0]
    assert "val_loss" in small().fit(TABLE).history_.epochs[0]  # the default holds out 10%


def test_nan_and_wrong_widths_get_scikit_learns_messages():
    bad = TABLE.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"Input X contains NaN"):
        small().fit(bad)
    est = small(hidden=[8]).fit(TABLE)
    with pytest.raises(ValueError, match=r"Input X contains NaN"):
        est.score_samples(bad)
    with pytest.raises(
        ValueError, match=r"X has 4 features, but AutoencoderTransformer is expecting 5"
    ):
        est.transform(TABLE[:, :4])
    with pytest.raises(ShapeError, match=r"inverse_transform is expecting 2 \(latent_dim\)"):
        est.inverse_transform(np.zeros((3, 5)))
    with pytest.raises(NotFittedError):
        small().predict(TABLE)


def test_read_only_float32_data_with_no_normalisation_fits_without_warnings():
    x = TABLE.astype(np.float32)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = small(hidden=[8], normalize="none").fit(x)
    assert est.normalization_.kind == "none" and est.transform(x).dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_and_serves_on_cpu():
    cpu = small(hidden=[8], epochs=3).fit(TABLE)
    gpu = small(hidden=[8], epochs=3, device="cuda").fit(TABLE)
    assert next(gpu.model_.parameters()).device.type == "cpu"
    # same seed, same batches, same initial weights: only kernel rounding differs
    np.testing.assert_allclose(gpu.transform(TABLE), cpu.transform(TABLE), atol=1e-3)


def test_score_compares_models_by_reconstruction_whatever_their_anomaly_score():
    # score_samples is the model's own score (an RBM's free energy, which leaves out its
    # partition function); score, which GridSearchCV maximises, is the reconstruction
    # error every model has
    X = np.random.default_rng(0).random((80, 6))
    est = AutoencoderTransformer("rbm", latent_dim=3, epochs=2, random_state=0, probabilities=True)
    est.fit(X)
    x = torch.from_numpy(est.normalization_.apply(X)).double()
    model = est.model_.double().eval()
    error = model.score(x, kind="reconstruction").numpy()
    # in units of the training rows' spread (one for all: these features share a scale;
    # data in [0, 1] is not normalised)
    assert est.normalization_.kind == "none"
    np.testing.assert_allclose(est.score(X), -error.mean() / X.std() ** 2, rtol=1e-6)
    np.testing.assert_allclose(est.score_samples(X), -model.score(x).numpy(), rtol=1e-6)


def test_score_is_in_the_same_units_whatever_the_normalisation():
    # GridSearchCV over models (or normalize) compares score(): "auto" standardises for
    # one model and min-max scales for another, so normalised units would not compare
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 4)) @ rng.normal(size=(4, 6)) * [1, 10, 100, 1, 10, 100]
    fits = {n: small(normalize=n).fit(X) for n in ("standardize", "minmax")}
    restored = {n: est.inverse_transform(est.transform(X)) for n, est in fits.items()}
    for n, est in fits.items():  # features in units of their own: each its own spread
        want = -np.mean(((restored[n] - X) / X.std(0)) ** 2)
        np.testing.assert_allclose(est.score(X), want, rtol=1e-5)


def test_image_models_and_an_input_shape_are_refused_with_the_estimators_reasons():
    from aecore.errors import ConfigError

    X = np.random.default_rng(0).random((20, 64))
    with pytest.raises(ConfigError, match="takes tabular rows.*'conv' takes images"):
        AutoencoderTransformer("conv", epochs=1).fit(X)
    # it was an internal TypeError (the keyword given twice)
    with pytest.raises(ConfigError, match="input_shape comes from X's columns"):
        AutoencoderTransformer("ae", input_shape=(64,), epochs=1).fit(X)


def test_inverse_transform_keeps_float64_precision():
    # a feature far from zero for its spread (a timestamp): float32 data units are
    # multiples of 128 there
    rng = np.random.default_rng(2)
    X = np.column_stack([1.7e9 + 100 * rng.random(60), rng.random(60)])
    est = small(normalize="standardize").fit(X)
    restored = est.inverse_transform(est.transform(X))
    assert restored.dtype == np.float64 and np.any(restored[:, 0] % 128 != 0)


def test_an_estimator_pickled_before_scores_were_in_data_units_still_scores():
    est = small().fit(TABLE)
    old = pickle.loads(pickle.dumps(est))
    del old._error_scale  # what an earlier version pickled
    x = est.normalization_.apply(TABLE)
    assert old.score(TABLE) == pytest.approx(float(np.mean(est._scores(x, "reconstruction"))))


def test_grey_values_in_unit_range_train_an_rbm_without_its_warning():
    """Grey pixels already in [0, 1] (digits / 16, or a MinMaxScaler's output in a
    pipeline) are the RBM's probabilities, as the estimator's own scaling makes them: no
    NonBinaryDataWarning on a normal use; a caller who chose the units keeps the choice."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    X = load_digits().data[:200]
    fits = {
        "estimator": lambda: AutoencoderTransformer("rbm", epochs=1).fit(X / 16.0),
        "detector": lambda: aecore.AnomalyDetector("rbm", epochs=1).fit(X / 16.0),
        "pipeline": lambda: make_pipeline(
            MinMaxScaler(), AutoencoderTransformer("rbm", epochs=1)
        ).fit(X),
    }
    for name, fit in fits.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit()
        assert not [w for w in caught if "non-binary" in str(w.message)], name
    with pytest.warns(UserWarning, match="non-binary"):
        AutoencoderTransformer("rbm", epochs=1, probabilities=False).fit(X / 16.0)


def test_estimator_records_and_names_what_it_used():
    X = load_iris().data
    few = AutoencoderTransformer("ae", latent_dim=2, epochs=1, random_state=0).fit(X[:5])
    assert few.validation_fraction_ == 0.0  # 10% of 5 rows is no row: nothing held out
    many = AutoencoderTransformer("ae", latent_dim=2, epochs=1, random_state=0).fit(X)
    assert many.validation_fraction_ == many.validation_fraction > 0
    with pytest.raises(ConfigError, match=r"random_state must be an int in \[0, 4294967295\]"):
        AutoencoderTransformer("ae", epochs=1, random_state=2**40).fit(X)
    # codes read only (pandas' copy-on-write views are): decoded without torch's warning
    codes = many.transform(X)
    codes.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert many.inverse_transform(codes).shape == X.shape


def test_the_trainers_warnings_name_the_estimators_parameters():
    # they said "val_fraction" and "Pass val_data", neither of which the estimator takes
    from aecore.errors import IgnoredSettingWarning

    with pytest.warns(IgnoredSettingWarning) as caught:
        small(patience=3, validation_fraction=0.0).fit(TABLE)
    said = " ".join(str(w.message) for w in caught)
    assert "patience=3 needs validation data" in said and "validation_fraction=0)" in said
    assert "val_data" not in said and "a validation_fraction > 0" in said
    with pytest.warns(UserWarning, match=r"^validation_fraction=0.9 holds out 108 of the 120"):
        small(validation_fraction=0.9).fit(TABLE)


def test_estimator_messages_offer_only_what_the_estimator_takes():
    # a diverging fit told the user to "set grad_clip", which neither estimator takes
    from aecore.errors import IgnoredSettingWarning, TrainingError

    X = np.random.RandomState(0).randn(100, 6)
    with pytest.raises(TrainingError, match="Lower the learning rate") as info:
        aecore.AnomalyDetector("vae", epochs=3, lr=10.0, random_state=0).fit(X)
    assert "grad_clip" not in str(info.value)
    # a hold-out of every row was dropped in silence (0.95 warned, 0.99 did not)
    with pytest.warns(
        IgnoredSettingWarning, match=r"validation_fraction=0.99 would hold out all 50"
    ):
        small(validation_fraction=0.99).fit(X[:50])


def test_a_column_of_times_is_named_not_read_as_nanoseconds():
    import pandas as pd

    from aecore.errors import DataError

    frame = pd.DataFrame(np.random.RandomState(0).randn(30, 3), columns=list("abc"))
    frame["t"] = pd.Timestamp("2020-01-01")
    with pytest.raises(DataError, match=r"column 't' \(datetime64"):
        small().fit(frame)
