"""A detector decides the same rows the same way wherever it runs (estimator, model
folder, ONNX export) and refuses what it cannot score, as PyOD's detectors do."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch

import aecore
from aecore.errors import ConfigError, DataError, ModelFileError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def served_copies(detector, tmp_path, name="m"):
    """The detector's model as a folder run by torch and as an export of all parts."""
    from aecore import open_model
    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    aecore.save(detector.model_, tmp_path / name)
    export_onnx(detector.model_, tmp_path / f"{name}.onnx", part="all")
    return open_model(str(tmp_path / name)), OnnxAutoencoder(tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("hparams", [{"model": "deep"}, {"output_activation": "sigmoid"}])
def test_served_detectors_clip_new_rows_to_the_models_range_as_the_estimator_does(
    digits, tmp_path, hparams
):
    # a model that takes [0, 1] sees brighter rows clipped; the served reconstruction
    # error once skipped that, and flagged 148 of 178 rows where the estimator flagged 18
    X, y = digits
    hparams = {"model": "ae", **hparams}
    # (training rows scored by the model itself: their labels are predict's)
    detector = aecore.AnomalyDetector(
        **hparams, latent_dim=4, epochs=3, random_state=0, cross_fit=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep's RBM pre-training notes grey values
        detector.fit(X[y == 0])
    assert detector.model_.input_range == (0.0, 1.0)
    brighter = np.where(X[y == 0] == 1.0, 1.5, X[y == 0])
    want = detector.decision_function(brighter)
    for served in served_copies(detector, tmp_path):
        assert served.input_range == (0.0, 1.0)
        np.testing.assert_allclose(served.decision_function(brighter), want, rtol=1e-4)
        assert np.array_equal(served.predict(brighter), detector.predict(brighter))
        # so do the plain score, encode and reconstruct, as the estimator's methods do
        np.testing.assert_allclose(served.score(brighter), want, rtol=1e-4)
        np.testing.assert_allclose(
            served.encode(brighter), detector.transform(brighter), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            served.reconstruct(brighter),
            detector.inverse_transform(detector.transform(brighter)),
            rtol=1e-4,
            atol=1e-5,
        )
    assert np.array_equal(detector.labels_, detector.predict(X[y == 0]))


@pytest.mark.parametrize(
    "hparams",
    [
        {"model": "ae", "output_activation": "sigmoid"},
        {"model": "rbm", "visible": "bernoulli"},
        {"model": "vae", "decoder": "bernoulli"},
        {"model": "denoising", "output_activation": "sigmoid", "score_kind": "denoising"},
    ],
    ids=lambda h: h["model"],
)
def test_rows_beyond_the_models_range_score_higher_the_farther_out_on_every_path(
    digits, tmp_path, hparams
):
    # rows were clipped to the model's range before scoring: one a hundred times brighter
    # than any training pixel scored as its clipped, ordinary self, and passed as normal
    X, y = digits
    detector = aecore.AnomalyDetector(**hparams, latent_dim=4, epochs=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an RBM's note on grey values
        detector.fit(X[y == 0])
    assert detector.model_.input_range == (0.0, 1.0)
    rows = np.repeat(X[y == 0][:1], 5, axis=0)
    rows[:, 20] = [1.0, 1.5, 3.0, 10.0, 100.0]  # at the edge, then farther and farther out
    want = detector.decision_function(rows)
    assert np.all(np.diff(want) > 0), want
    assert detector.predict(rows)[-1] == 1
    # rows inside the range score as before: by the model on the rows themselves
    edge = torch.from_numpy(rows[:1]).float()
    inside = detector.model_.score(edge, kind=detector.detector_.kind).double().numpy()
    np.testing.assert_allclose(want[:1], inside, rtol=1e-4)
    for served in served_copies(detector, tmp_path):
        np.testing.assert_allclose(served.decision_function(rows), want, rtol=1e-4)
        assert np.array_equal(served.predict(rows), detector.predict(rows))


def test_served_detectors_refuse_rows_with_nan_or_inf(digits, tmp_path):
    # a NaN row scored NaN, which no threshold calls an outlier: it was labelled normal
    X, y = digits
    detector = aecore.AnomalyDetector("ae", latent_dim=4, epochs=2, random_state=0)
    detector.fit(X[y == 0])
    bad = X[y == 3][:4].copy()
    bad[1, 5], bad[3, 0] = np.nan, -np.inf
    for served in served_copies(detector, tmp_path):
        for method in ("decision_function", "predict", "predict_proba", "predict_confidence"):
            with pytest.raises(DataError, match=r"NaN or infinite values \(rows 1, 3\)"):
                getattr(served, method)(bad)
    with pytest.raises(ValueError, match="NaN"):
        detector.predict(bad)


@pytest.mark.parametrize("name", ["denoising", "rbm", "vae", "ae"])
def test_served_detectors_take_an_empty_batch(digits, tmp_path, name):
    X, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an RBM's note on grey values
        detector = aecore.AnomalyDetector(name, latent_dim=4, epochs=2, random_state=0)
        detector.fit(X[y == 0])
    for served in served_copies(detector, tmp_path):
        empty = np.empty((0, 64))
        assert served.predict(empty).shape == (0,)
        assert served.predict_proba(empty).shape == (0, 2)


def test_a_salt_and_pepper_denoiser_exports_its_score_for_any_batch_size(digits, tmp_path):
    # its fixed corruptions once took the row count from len(x), an int the tracer
    # baked into the graph: the export of all parts failed
    X, y = digits
    detector = aecore.AnomalyDetector(
        corruption="salt_pepper", score_kind="denoising", epochs=2, random_state=0
    )
    detector.fit(X[y == 0])
    assert detector.detector_.kind == "denoising"
    for served in served_copies(detector, tmp_path):
        for rows in (X[:1], X[:37]):
            np.testing.assert_allclose(
                served.decision_function(rows), detector.decision_function(rows), rtol=1e-4
            )


def test_fit_refuses_training_rows_outside_the_models_range(digits):
    # new rows are clipped to the model's range: training on values beyond it gave
    # labels_ that predict(X_train) contradicted (10% against 100% flagged)
    from sklearn.datasets import load_wine

    X, y = digits
    with pytest.raises(
        DataError, match=r"normalize='standardize' leaves .* takes inputs in \[0, 1\]"
    ):
        aecore.AnomalyDetector(output_activation="sigmoid", normalize="standardize").fit(X)
    wine = load_wine().data
    with pytest.raises(DataError, match=r"normalize='none' .* normalize with 'minmax'"):
        aecore.AnomalyDetector("rbm", visible="bernoulli", normalize="none").fit(wine)
    # the defaults follow the model's range: the training rows get their own labels
    detector = aecore.AnomalyDetector(
        "rbm", visible="bernoulli", epochs=2, random_state=0, cross_fit=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RBM's note on grey values
        detector.fit(wine)
    assert np.array_equal(detector.labels_, detector.predict(wine))


def test_fit_sets_only_attributes_that_end_in_an_underscore(digits):
    X, y = digits
    detector = aecore.AnomalyDetector(epochs=1, random_state=0)
    before = set(vars(detector))
    detector.fit(X[y == 0])
    added = {k for k in set(vars(detector)) - before if not k.startswith("_")}
    assert added and all(k.endswith("_") for k in added), added
    # pickled when fit set ``detector``: still thresholds
    state = detector.__getstate__()
    state["detector"] = state.pop("detector_")
    old = aecore.AnomalyDetector.__new__(aecore.AnomalyDetector)
    old.__setstate__(state)
    assert np.array_equal(old.predict(X[:50]), detector.predict(X[:50]))


def test_predict_and_predict_proba_return_confidence_as_pyod_does(digits, tmp_path):
    X, y = digits
    detector = aecore.AnomalyDetector("ae", latent_dim=4, epochs=2, random_state=0)
    detector.fit(X[y == 0])
    for model in (detector, *served_copies(detector, tmp_path)):
        labels, confidence = model.predict(X[:30], return_confidence=True)
        assert np.array_equal(labels, model.predict(X[:30]))
        np.testing.assert_array_equal(confidence, model.predict_confidence(X[:30]))
        proba, confidence = model.predict_proba(X[:30], "unify", return_confidence=True)
        np.testing.assert_array_equal(proba, model.predict_proba(X[:30], method="unify"))
        with pytest.raises(ConfigError, match="return_confidence must be True or False"):
            model.predict(X[:3], return_confidence="yes")


def test_an_onnx_model_pickles_by_reopening_its_files(digits, tmp_path):
    X, y = digits
    detector = aecore.AnomalyDetector("ae", latent_dim=4, epochs=2, random_state=0)
    detector.fit(X[y == 0])
    _, served = served_copies(detector, tmp_path)
    copy = pickle.loads(pickle.dumps(served))
    assert np.array_equal(copy.predict(X), served.predict(X))
    np.testing.assert_array_equal(copy.reconstruct(X[:5]), served.reconstruct(X[:5]))
    # another export in its place is not silently taken for the pickled one
    blob = pickle.dumps(served)
    other = aecore.AnomalyDetector("ae", latent_dim=4, epochs=3, random_state=1).fit(X[y == 1])
    from aecore.onnx import export_onnx

    export_onnx(other.model_, tmp_path / "m.onnx", part="all", overwrite=True)
    with pytest.raises(ModelFileError, match="holds another export"):
        pickle.loads(blob)


def test_training_a_detectors_model_further_drops_its_stale_threshold(digits, tmp_path):
    X, y = digits
    detector = aecore.AnomalyDetector("ae", latent_dim=4, epochs=2, random_state=0)
    detector.fit(X[y == 0])
    model = detector.model_
    with pytest.warns(UserWarning, match=r"threshold fitted .* \(contamination 0.1\).* dropped"):
        aecore.Trainer(epochs=2, progress=False).fit(model, X[y == 0].astype(np.float32))
    assert model.detector is None
    # the estimator does not go on thresholding the new scores with the old threshold
    with pytest.raises(DataError, match="trained further after fit"):
        detector.predict(X[:5])
    aecore.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text()).get("detector") is None


def test_numpy_scalars_are_taken_as_numbers(digits):
    # a grid search over np.arange hands the estimator numpy integers
    from sklearn.model_selection import GridSearchCV

    X, y = digits
    detector = aecore.AnomalyDetector(
        epochs=np.int64(2), latent_dim=np.int64(4), contamination=np.float32(0.1),
        batch_size=np.int32(32), random_state=np.int64(0),
    )  # fmt: skip
    detector.fit(X[y == 0])
    assert type(detector.model_.latent_dim) is int and detector.threshold_ > 0
    search = GridSearchCV(
        aecore.AutoencoderTransformer("ae", epochs=1, random_state=0),
        {"latent_dim": np.arange(2, 4)},
        cv=2,
    )
    assert search.fit(X[:200]).best_params_["latent_dim"] in (2, 3)
    config = aecore.TrainConfig(epochs=np.int64(3), lr=np.float32(0.01))
    assert json.loads(json.dumps(config.__dict__))["epochs"] == 3
    assert type(config.lr) is float


def test_served_scores_are_the_models_own_by_default(digits, tmp_path):
    # a served model once answered score() with the reconstruction error whatever the
    # model's score: an RBM's free energy in torch, [0.067 0.061 ...] when served
    import torch

    from aecore.cli import main
    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    X, _ = digits
    model = aecore.create("rbm", input_shape=(64,), latent_dim=8, probabilities=True)
    aecore.Trainer(epochs=1, progress=False).fit(model, X[:200])
    model.eval()
    rows = X[200:210].astype(np.float32)
    with torch.no_grad():
        energy = model.score(torch.from_numpy(rows)).double().numpy()
        error = model.score(torch.from_numpy(rows), kind="reconstruction").numpy()
    aecore.save(model, tmp_path / "m")
    export_onnx(model, tmp_path / "m.onnx", part="all")
    for served in (aecore.open_model(str(tmp_path / "m")), OnnxAutoencoder(tmp_path / "m.onnx")):
        assert served.default_score_kind == "free_energy"
        np.testing.assert_allclose(served.score(rows), energy, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(served.score(rows, kind="reconstruction"), error, rtol=1e-4)
    # a one-file export computes the reconstruction error only: its default says so, and
    # asked for more it says what it lacks; a kind the model lacks is named as such
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no detector: the served kind is named, not warned
        export_onnx(model, tmp_path / "full.onnx")
    alone = OnnxAutoencoder(tmp_path / "full.onnx")
    assert alone.default_score_kind == "reconstruction"
    np.testing.assert_allclose(alone.score(rows), error, rtol=1e-4)
    with pytest.raises(DataError, match="score graph.*kind='reconstruction'"):
        alone.score(rows, kind="free_energy")
    for served in (alone, aecore.open_model(str(tmp_path / "m"))):
        with pytest.raises(ConfigError, match="scores by 'reconstruction', 'free_energy'; got"):
            served.score(rows, kind="elbo")
    np.save(tmp_path / "rows.npy", rows)
    for kind, want in [([], energy), (["--kind", "reconstruction"], error)]:
        out = tmp_path / f"s{len(kind)}.npy"
        args = ["score", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "rows.npy")]
        assert main([*args, "--output", str(out), *kind]) == 0
        np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-4)


def test_a_detectors_folder_and_export_score_by_its_kind_by_default(digits, tmp_path):
    # a VAE detector on the ELBO: the folder's score() gave the log-likelihood (the
    # model's default) and its export's the reconstruction error, without a word
    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    X, _ = digits
    detector = aecore.AnomalyDetector("vae", score_kind="elbo", epochs=1, random_state=0)
    detector.fit(X[:150])
    aecore.save(detector.model_, tmp_path / "v")
    export_onnx(tmp_path / "v", tmp_path / "v.onnx", part="all")
    rows = X[150:160]
    want = detector.decision_function(rows)
    for served in (aecore.open_model(str(tmp_path / "v")), OnnxAutoencoder(tmp_path / "v.onnx")):
        np.testing.assert_allclose(served.score(rows), want, rtol=1e-4)
        np.testing.assert_allclose(served.decision_function(rows), want, rtol=1e-4)
        assert served.threshold_ == detector.threshold_  # PyOD's attribute, served too
    # a one-file export holds no ELBO graph: its score() stays the reconstruction error
    with pytest.warns(UserWarning, match=r"vae scores rows by elbo \(its detector's\)"):
        export_onnx(tmp_path / "v", tmp_path / "one.onnx")
    alone = OnnxAutoencoder(tmp_path / "one.onnx")
    assert alone.default_score_kind == "reconstruction"
    np.testing.assert_allclose(
        alone.score(rows), alone.score(rows, kind="reconstruction"), rtol=1e-6
    )
    # no detector: no threshold_, as an attribute lookup says (hasattr, getattr)
    aecore.save(aecore.create("ae", input_shape=(64,), latent_dim=2), tmp_path / "plain")
    assert getattr(aecore.open_model(str(tmp_path / "plain")), "threshold_", None) is None


def test_values_beyond_float32_are_refused_everywhere(tmp_path):
    # 1e300 once became inf in float32, scored NaN and was labelled an inlier
    from sklearn.datasets import load_wine

    X = load_wine().data
    detector = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(X[:100])
    rows = X[:3].copy()
    rows[1, 4] = 1e300
    for served in (detector, *served_copies(detector, tmp_path)):
        for method in ("decision_function", "predict", "predict_proba"):
            with pytest.raises(DataError, match=r"beyond float32's range.*rows 1\b"):
                getattr(served, method)(rows)


def test_a_score_that_is_not_finite_is_never_an_inlier():
    # NaN and -inf are below no threshold: refused; +inf (a served float32 score that
    # overflowed where the estimator's float64 one did not) is an outlier, not an error
    from aecore.detection import DetectorMethods, ScoreThreshold

    class Overflowing(DetectorMethods):
        detector = ScoreThreshold.fit(np.arange(10.0), 0.1)
        scores = np.array([0.5, np.nan, -np.inf])

        def _anomaly_scores(self, X):
            return self.scores

    with pytest.raises(DataError, match="score of rows 1, 2 is not a number or -inf"):
        Overflowing().predict(np.zeros((3, 2)))
    served = Overflowing()
    served.scores = np.array([0.5, np.inf])
    assert served.predict(np.zeros((2, 2))).tolist() == [0, 1]
    for method in ("linear", "unify"):
        assert served.predict_proba(np.zeros((2, 2)), method=method)[1].tolist() == [0.0, 1.0]
    extreme = Overflowing()
    extreme.scores = np.array([0.5, 1e300])  # as sure as for any score above every other
    confidence = served.predict_confidence(np.zeros((2, 2)))
    assert confidence.tolist() == extreme.predict_confidence(np.zeros((2, 2))).tolist()


def test_a_feature_far_from_zero_keeps_its_variation_when_served(tmp_path):
    # a timestamp (1.7e9 +- 100) folded into a float32 graph lost its variation before the
    # shift came off: scores off by up to 0.73, 12 of 300 labels flipped
    from aecore.runtime import OnnxAutoencoder

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    X[:, 0] = 1.7e9 + 100 * X[:, 0]
    detector = aecore.AnomalyDetector("ae", latent_dim=2, epochs=3, random_state=0).fit(X)
    folder, export = served_copies(detector, tmp_path)
    assert not OnnxAutoencoder(tmp_path / "m.onnx").normalizes_itself
    want = detector.decision_function(X)
    for served in (folder, export):
        np.testing.assert_allclose(served.decision_function(X), want, rtol=1e-4, atol=1e-5)
        assert np.array_equal(served.predict(X), detector.predict(X))


def test_served_models_check_a_dataframes_columns_against_the_fit(tmp_path):
    # reordered columns were refused by the estimator but scored as they came by the
    # folder and the export: 100% of rows flagged (68.5% in the right order)
    pytest.importorskip("pandas")
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    X = data.frame[data.feature_names]
    detector = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(X)
    assert detector.model_.feature_names == list(data.feature_names)
    shuffled = X[list(reversed(data.feature_names))]
    renamed = X.rename(columns={"alcohol": "ethanol"})
    for served in served_copies(detector, tmp_path):
        assert served.feature_names == list(data.feature_names)
        np.testing.assert_allclose(
            served.decision_function(X), detector.decision_function(X), rtol=1e-4
        )
        with pytest.raises(DataError, match=r"another order than at fit.*X\[model.feature_names\]"):
            served.predict(shuffled)
        with pytest.raises(DataError, match=r"missing \['alcohol'\], unexpected \['ethanol'\]"):
            served.score(renamed)
        served.predict(X.to_numpy())  # plain arrays carry no names to check


def test_the_cli_checks_a_csv_header_against_the_fitted_columns(tmp_path, capsys):
    # a header naming the columns in reverse was dropped, and the rows scored ~141257
    pytest.importorskip("pandas")
    from sklearn.datasets import load_wine

    from aecore.cli import main

    data = load_wine(as_frame=True)
    X = data.frame[data.feature_names]
    detector = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(X)
    served_copies(detector, tmp_path)
    X.to_csv(tmp_path / "same.csv", index=False)
    X[list(reversed(data.feature_names))].to_csv(tmp_path / "reversed.csv", index=False)
    for model in (tmp_path / "m", tmp_path / "m.onnx"):
        args = ["score", str(model), "--output", str(tmp_path / f"{model.name}.npy")]
        assert main([*args, "--input", str(tmp_path / "same.csv")]) == 0
        assert main([*args, "--input", str(tmp_path / "reversed.csv"), "--overwrite"]) == 1
        assert "another order than at fit" in capsys.readouterr().err


def test_numeric_and_quoted_column_names_in_a_csv_header(tmp_path, capsys):
    # a header of wavelengths was scored as a data row (9.66e3); a quoted name holding a
    # comma was split in two
    pd = pytest.importorskip("pandas")
    from aecore.cli import main

    rng = np.random.default_rng(0)
    columns = ["400", "410", "income, annual", "430"]
    X = pd.DataFrame(rng.normal(size=(80, 4)), columns=columns)
    detector = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(X)
    served_copies(detector, tmp_path)
    X[:5].to_csv(tmp_path / "five.csv", index=False)
    for model in (tmp_path / "m", tmp_path / "m.onnx"):
        out = tmp_path / f"{model.name}.npy"
        assert main(["score", str(model), "--input", str(tmp_path / "five.csv"),
                     "--output", str(out)]) == 0  # fmt: skip
        np.testing.assert_allclose(np.load(out), detector.decision_function(X[:5]), rtol=1e-4)


def test_a_served_score_refuses_rows_it_cannot_score(digits, tmp_path):
    X, y = digits
    detector = aecore.AnomalyDetector("ae", epochs=1, random_state=0).fit(X[y == 0])
    bad = X[:2].copy()
    bad[1, 3] = np.nan
    for served in served_copies(detector, tmp_path):
        with pytest.raises(DataError, match=r"NaN or infinite values \(rows 1\)"):
            served.score(bad)


def test_a_one_file_export_says_which_score_it_gives_and_how_to_get_the_detectors(tmp_path, capsys):
    # a one-file export of an RBM detector scores reconstruction errors, while its
    # threshold is in free energy: the command line names the kind it wrote, and the
    # detector methods point at an export of all parts
    from sklearn.datasets import load_wine

    from aecore.cli.main import main
    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    X = load_wine().data
    detector = aecore.AnomalyDetector("rbm", epochs=2, random_state=0).fit(X[:100])
    folder, everything = served_copies(detector, tmp_path)
    with pytest.warns(UserWarning, match=r"rbm scores rows by free_energy \(its detector's\)"):
        export_onnx(detector.model_, tmp_path / "one.onnx", part="full")
    one = OnnxAutoencoder(tmp_path / "one.onnx")
    assert folder.score_kind() == everything.score_kind() == "free_energy"
    assert one.score_kind() == "reconstruction" and one.score_kind("free_energy") == "free_energy"
    with pytest.raises(DataError, match=r"this export lacks.*--all"):
        one.predict(X[:3])
    np.save(tmp_path / "x.npy", X[:3])
    for model, kind in [(tmp_path / "one.onnx", "reconstruction"), (tmp_path / "m", "free_energy")]:
        out = tmp_path / f"{kind}.npy"
        assert (
            main(["score", str(model), "--input", str(tmp_path / "x.npy"), "--output", str(out)])
            == 0
        )
        assert f"score ({kind}): 3 rows" in capsys.readouterr().out


def test_the_command_line_predicts_with_the_saved_detector(digits, tmp_path, capsys):
    # a pipeline without Python had scores but no labels: it had to re-derive the
    # threshold, which the model folder and its export already carry
    from aecore.cli.main import main

    X, y = digits
    detector = aecore.AnomalyDetector("ae", latent_dim=4, epochs=2, random_state=0)
    detector.fit(X[y == 0])
    rows = X[:40]
    np.save(tmp_path / "rows.npy", rows)
    labels = detector.predict(rows)
    proba = detector.predict_proba(rows, method="unify")[:, 1]
    confidence = detector.predict_confidence(rows)
    served_copies(detector, tmp_path)  # the folder m and the export m.onnx
    for model in (tmp_path / "m", tmp_path / "m.onnx"):
        out = tmp_path / f"{model.name}.npy"
        args = ["predict", str(model), "--input", str(tmp_path / "rows.npy")]
        assert main([*args, "--output", str(out)]) == 0
        assert np.array_equal(np.load(out), labels)
        said = capsys.readouterr().out
        assert f"{int(labels.sum())} outliers: reconstruction score above" in said
        out = tmp_path / f"{model.name}.csv"
        assert main([*args, "--output", str(out), "--proba", "unify", "--confidence"]) == 0
        table = np.loadtxt(out, delimiter=",")
        assert np.array_equal(table[:, 0], labels)
        np.testing.assert_allclose(table[:, 1], proba, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(table[:, 2], confidence, rtol=1e-3, atol=1e-6)
    plain = aecore.AutoencoderTransformer("ae", latent_dim=4, epochs=1, random_state=0).fit(X)
    aecore.save(plain.model_, tmp_path / "plain")
    args = ["predict", str(tmp_path / "plain"), "--input", str(tmp_path / "rows.npy")]
    assert main([*args, "--output", str(tmp_path / "no.npy")]) == 1
    assert "without a detector threshold: `aecore score`" in capsys.readouterr().err
    assert not (tmp_path / "no.npy").exists()


def test_an_export_from_before_scores_charged_rows_scores_them_as_it_did(digits, tmp_path):
    # its threshold was fitted on scores of clipped rows, and its score graph (if any)
    # clips without charging: the runtime keeps the whole export on that rule
    import onnx

    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    X, y = digits
    detector = aecore.AnomalyDetector("ae", output_activation="sigmoid", latent_dim=4,
                                      epochs=2, random_state=0)  # fmt: skip
    detector.fit(X[y == 0])
    export_onnx(detector.model_, tmp_path / "new.onnx")
    graph = onnx.load(tmp_path / "new.onnx")
    kept = [p for p in graph.metadata_props if p.key != "aecore.scores_charged"]
    assert len(kept) == len(graph.metadata_props) - 1
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, tmp_path / "old.onnx")
    rows = np.repeat(X[y == 0][:1], 3, axis=0)
    rows[:, 20] = [1.0, 3.0, 30.0]
    model = detector.model_
    with torch.no_grad():
        clipped = model.score(torch.from_numpy(np.clip(rows, 0, 1)).float()).numpy()
        given = model.score(torch.from_numpy(rows).float()).numpy()
    np.testing.assert_allclose(OnnxAutoencoder(tmp_path / "old.onnx").score(rows), clipped,
                               rtol=1e-4)  # fmt: skip
    np.testing.assert_allclose(OnnxAutoencoder(tmp_path / "new.onnx").score(rows), given,
                               rtol=1e-4)  # fmt: skip
    assert given[2] > given[1] > given[0] == pytest.approx(clipped[2])


def test_an_export_that_cannot_serve_the_models_score_says_so_when_written(tmp_path):
    # an export of all parts of a model whose detector's kind it cannot compute wrote no
    # score graph in silence; the served model then advised the very export just run
    from sklearn.datasets import load_wine

    from aecore import registry
    from aecore.onnx import export_onnx
    from aecore.runtime import OnnxAutoencoder

    class TorchOnly(registry.model_class("denoising")):
        exportable_score_kinds = ("reconstruction",)

    registry.register("denoising-torch-only", TorchOnly)
    try:
        X = load_wine().data
        detector = aecore.AnomalyDetector(
            "denoising-torch-only", score_kind="denoising", epochs=2, random_state=0
        ).fit(X[:100])
        with pytest.warns(UserWarning, match=r"by denoising \(its detector's\).*deterministic"):
            export_onnx(detector.model_, tmp_path / "m.onnx", part="all")
        served = OnnxAutoencoder(tmp_path / "m.onnx")
        with pytest.raises(DataError, match="export of all parts has none: the model does not"):
            served.predict(X[:3])
    finally:
        registry.unregister("denoising-torch-only")
