"""aecore.AnomalyDetector and aecore.detection: PyOD's conventions, checked against
PyOD's own code, and the threshold travelling with the model to a folder and to ONNX."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils.estimator_checks import parametrize_with_checks

import aecore
from aecore.detection import ScoreThreshold, _betainc, binomial_cdf
from aecore.errors import ConfigError, DataError, IgnoredSettingWarning, ModelFileError


def _pyod_detector(train, contamination):
    """PyOD's BaseDetector over fixed scores: its threshold, probabilities and
    confidence code, run on the same numbers."""
    base = pytest.importorskip("pyod.models.base")

    class Fixed(base.BaseDetector):
        def __init__(self, contamination=0.1):
            super().__init__(contamination=contamination)

        def fit(self, X, y=None):
            self._set_n_classes(None)
            self.decision_scores_ = X[:, 0]
            self._process_decision_scores()
            return self

        def decision_function(self, X):
            return X[:, 0]

    return Fixed(contamination).fit(np.asarray(train)[:, None])


@pytest.mark.parametrize("contamination", [0.05, 0.1, 0.3])
def test_thresholds_probabilities_and_confidence_are_pyods(contamination):
    rng = np.random.default_rng(0)
    train = rng.gamma(2.0, size=400)
    test = np.concatenate([rng.gamma(2.0, size=300), [-1.0, 60.0, train[7]]])
    pyod = _pyod_detector(train, contamination)
    ours = ScoreThreshold.fit(train, contamination)
    assert ours.threshold == pytest.approx(pyod.threshold_)
    assert np.array_equal(ours.labels(train), pyod.labels_)
    assert np.array_equal(ours.labels(test), pyod.predict(test[:, None]))
    for method in ("linear", "unify"):
        got = ours.proba(test, method)
        np.testing.assert_allclose(
            got, pyod.predict_proba(test[:, None], method=method), atol=1e-12
        )
    np.testing.assert_allclose(
        ours.confidence(test), pyod.predict_confidence(test[:, None]), atol=1e-9
    )


def test_a_flagged_row_has_confidence_with_fewer_rows_than_one_over_contamination():
    # 8 rows at contamination 0.1 expect floor(0.8) = 0 outliers in PyOD's count, which
    # gave every flagged row confidence 0; counted as one (the threshold flags the top
    # training row), a far score gets 0.9 ** 8, as sure as 8 rows can make it
    train = np.linspace(1.0, 2.0, 8)
    t = ScoreThreshold.fit(train, 0.1)
    far, inlier = t.confidence([100.0, 1.5])
    assert t.labels([100.0, 1.5, 1.99]).tolist() == [1, 0, 1]
    assert far == pytest.approx(0.9**8) and inlier > 0.99
    assert 0 < t.confidence([1.99])[0] < far


def test_a_threshold_on_a_training_score_moves_off_it():
    # 21 scores at contamination 0.1: the percentile is the 19th score itself, and a
    # served model's float32 rescoring of that row landed a hair above it (an outlier)
    train = np.linspace(1.0, 3.0, 21)
    t = ScoreThreshold.fit(train, 0.1)
    assert train[18] < t.threshold < train[19]
    assert t.labels(train).sum() == 2 == t.labels(train * (1 + 1e-7)).sum()
    # confidence counts a score within float32 rounding of a training score as at it
    np.testing.assert_allclose(t.confidence(train * (1 - 1e-7)), t.confidence(train))


def test_the_incomplete_beta_without_scipy_matches_scipy():
    from scipy.special import betainc

    x = np.concatenate([np.linspace(0, 1, 101), [1e-12, 1 - 1e-12]])
    for a, b in [(1, 1), (5, 3), (0.5, 0.5), (900, 101), (3, 7000), (50_000, 2)]:
        np.testing.assert_allclose(_betainc(a, b, x), betainc(a, b, x), atol=1e-11)
    assert np.array_equal(binomial_cdf(-1, 5, np.array([0.3])), [0.0])
    assert np.array_equal(binomial_cdf(5, 5, np.array([0.3])), [1.0])


@settings(max_examples=40, deadline=None)
@given(
    train=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=60),
    test=st.lists(st.floats(-2e3, 2e3), min_size=1, max_size=20),
    contamination=st.floats(0.01, 0.5),
)
def test_decisions_are_monotone_in_the_score(train, test, contamination):
    t = ScoreThreshold.fit(train, contamination)
    s = np.sort(np.asarray(test))
    labels = t.labels(s)
    assert np.all(np.diff(labels) >= 0)  # a higher score is never "less" an outlier
    for method in ("linear", "unify"):
        p = t.proba(s, method)
        assert np.allclose(p.sum(1), 1.0) and np.all((p >= 0) & (p <= 1))
        assert np.all(np.diff(p[:, 1]) >= -1e-12)
    c = t.confidence(s)
    assert np.all((c >= 0) & (c <= 1))
    assert ScoreThreshold.from_dict(json.loads(json.dumps(t.to_dict()))).to_dict() == t.to_dict()


def test_bad_thresholds_say_what_is_wrong():
    with pytest.raises(ConfigError, match=r"contamination must lie in \(0, 0.5\], got 0.7"):
        ScoreThreshold.fit([1.0, 2.0], 0.7)
    with pytest.raises(DataError, match="1 of 3 training scores are not finite"):
        ScoreThreshold.fit([1.0, np.nan, 2.0], 0.1)
    t = ScoreThreshold.fit([1.0, 2.0, 3.0], 0.1)
    with pytest.raises(ConfigError, match="method must be one of linear, unify"):
        t.proba([1.0], "softmax")
    with pytest.raises(DataError, match="kept_scores must be ascending"):
        ScoreThreshold.from_dict({**t.to_dict(), "kept_scores": [3.0, 1.0]})


@pytest.fixture(scope="module")
def fitted():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    detector = aecore.AnomalyDetector("ae", latent_dim=8, epochs=15, random_state=0)
    detector.fit(X[y == 0][:120])
    return detector, X[:200], y[:200]


def test_a_fitted_detector_has_pyods_attributes_and_methods(fitted):
    detector, X, y = fitted
    n = len(detector.decision_scores_)
    assert n == 120 and detector.labels_.mean() == pytest.approx(0.1, abs=1 / n)
    assert np.array_equal(detector.labels_, (detector.decision_scores_ > detector.threshold_))
    scores = detector.decision_function(X)
    np.testing.assert_allclose(scores, -detector.score_samples(X))
    assert set(np.unique(detector.predict(X))) <= {0, 1}
    assert np.array_equal(detector.predict(X), (scores > detector.threshold_).astype(int))
    assert detector.predict_proba(X, method="unify").shape == (len(X), 2)
    assert np.all((detector.predict_confidence(X) >= 0) & (detector.predict_confidence(X) <= 1))
    # the other digits are the outliers: the scores rank them so
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y != 0, scores) > 0.95


def test_the_threshold_travels_to_the_folder_and_to_onnx(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    from aecore import open_model
    from aecore.cli import main
    from aecore.runtime import OnnxAutoencoder

    detector, X, _ = fitted
    aecore.save(detector.model_, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["detector"]["n"] == 120
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "m.onnx")]) == 0
    for served in (open_model(str(tmp_path / "m")), OnnxAutoencoder(tmp_path / "m.onnx")):
        scores = served.decision_function(X)
        np.testing.assert_allclose(scores, detector.decision_function(X), rtol=1e-4, atol=1e-7)
        assert served.detector.threshold == detector.threshold_
        t = served.detector
        assert np.array_equal(served.predict(X), t.labels(scores))
        np.testing.assert_allclose(served.predict_proba(X), t.proba(scores))
        np.testing.assert_allclose(served.predict_confidence(X), t.confidence(scores))
    # a model saved without a detector says how to get one
    plain = aecore.create("ae", input_shape=(64,), latent_dim=2)
    aecore.save(plain, tmp_path / "plain")
    with pytest.raises(DataError, match="no detector threshold: fit aecore.AnomalyDetector"):
        open_model(str(tmp_path / "plain")).predict(X)
    # a damaged threshold is a clear load error
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    record["detector"]["kept_scores"] = "oops"
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelFileError, match="malformed detector threshold"):
        aecore.load(tmp_path / "m")
    del record["detector"]["kept_scores"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelFileError, match="threshold: it lacks the field 'kept_scores'"):
        aecore.load(tmp_path / "m")


def test_detectors_on_other_scores_are_served_from_the_exports_score_graph(tmp_path):
    # the RBM thresholds its free energy, the denoiser its restoration error, the VAE its
    # likelihood from fixed draws: an export of all parts carries a score graph, so
    # onnxruntime serves the same decisions
    pytest.importorskip("onnxruntime")
    import warnings

    from sklearn.datasets import load_digits

    from aecore import open_model
    from aecore.cli import main
    from aecore.runtime import OnnxAutoencoder

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    for name in ("rbm", "denoising", "vae"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an RBM's note on grey values
            kind = "denoising" if name == "denoising" else None  # (not its default)
            detector = aecore.AnomalyDetector(
                name, latent_dim=4, epochs=3, random_state=0, score_kind=kind
            )
            detector.fit(X[y == 0][:100])
        aecore.save(detector.model_, tmp_path / name)
        out = tmp_path / f"{name}.onnx"
        assert main(["export", str(tmp_path / name), "--out", str(out), "--all"]) == 0
        served = OnnxAutoencoder(out)
        # a score of many passes per row is served in proportionally smaller batches
        meta = served._graph("score").session.get_modelmeta().custom_metadata_map
        assert meta["aecore.score_passes"] == {"rbm": "1", "denoising": "5", "vae": "10"}[name]
        want = detector.decision_function(X)
        for model in (served, open_model(str(tmp_path / name))):
            np.testing.assert_allclose(model.decision_function(X), want, rtol=1e-5, atol=1e-5)
            assert np.array_equal(model.predict(X), detector.predict(X))
    # the full graph alone cannot compute a likelihood: a clear refusal, not a wrong score
    alone = tmp_path / "alone.onnx"
    assert main(["export", str(tmp_path / "vae"), "--out", str(alone)]) == 0
    with pytest.raises(DataError, match="'log_likelihood' needs the export's score graph.*folder"):
        OnnxAutoencoder(alone).predict(X)
    with pytest.raises(ModelFileError, match="is the score graph of an export: open"):
        OnnxAutoencoder(tmp_path / "rbm.score.onnx")
    # a new export of all parts replaces the whole set: no stale score graph stays
    plain = tmp_path / "plain"
    aecore.save(aecore.create("ae", input_shape=(64,), latent_dim=2), plain)
    argv = ["export", str(plain), "--out", str(tmp_path / "rbm.onnx"), "--all", "--overwrite"]
    assert main(argv) == 0
    assert not (tmp_path / "rbm.score.onnx").exists()
    # a file of the user's at that name is not an export's to drop
    (tmp_path / "rbm.score.onnx").write_text("another tool's scoring model")
    with pytest.raises(ModelFileError, match="rbm.score.onnx is not an aecore export"):
        aecore.export_onnx(plain, tmp_path / "rbm.onnx", part="all", overwrite=True)
    assert (tmp_path / "rbm.score.onnx").read_text() == "another tool's scoring model"


@pytest.mark.parametrize(
    "name",
    [n for n in aecore.list_models() if "vector" in aecore.capabilities(aecore.model_class(n))],
)
def test_every_vector_model_detects_with_its_defaults(name):
    # AnomalyDetector("vae") once failed on its default normalisation: every model fits
    # with every default and ranks random rows above two noisy patterns
    import warnings

    rng = np.random.default_rng(0)
    prototypes = (rng.random((2, 16)) < 0.5).astype(float)  # two patterns, lightly noised
    normal = np.clip(prototypes[rng.integers(0, 2, 120)] + rng.normal(0, 0.05, (120, 16)), 0, 1)
    odd = rng.random((20, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an RBM's note on grey values as probabilities
        detector = aecore.AnomalyDetector(name, latent_dim=4, epochs=10, random_state=0).fit(normal)
    scores = detector.decision_function(np.vstack([normal[:20], odd]))
    assert np.isfinite(scores).all() and scores[20:].mean() > scores[:20].mean()


def test_a_detector_with_nothing_set_reaches_the_benchmarks_bar():
    # AnomalyDetector() once took the transformer's defaults (ae, a 2-unit code, 50
    # epochs): mean ROC-AUC 0.989 on the one-class digits benchmark, below PyOD's KNN
    from sklearn.metrics import roc_auc_score

    from aecore_benchmarks.anomaly import one_class_tasks

    aucs = []
    for _, train, test, anomalous in one_class_tasks("digits", None):
        detector = aecore.AnomalyDetector(random_state=0).fit(train)
        aucs.append(roc_auc_score(anomalous, detector.decision_function(test)))
    assert detector.get_params()["model"] == "denoising"
    assert np.mean(aucs) >= 0.996, aucs


def test_a_detector_with_nothing_set_holds_on_features_in_units_of_their_own():
    # wine's thirteen quantities span hue near 1 to proline near 1000: a scale floor at
    # the features' mean scale once left proline alone to decide (mean ROC-AUC 0.60;
    # PyOD's PCA reaches 0.978 on the same splits)
    from sklearn.metrics import roc_auc_score

    from aecore_benchmarks.anomaly import one_class_tasks

    aucs = []
    for _, train, test, anomalous in one_class_tasks("wine", None):
        detector = aecore.AnomalyDetector(random_state=0).fit(train)
        aucs.append(roc_auc_score(anomalous, detector.decision_function(test)))
    assert np.mean(aucs) >= 0.93, aucs


def test_a_detector_holds_out_rows_only_where_enough_remain_to_judge_epochs():
    # 10% of a digit class is 14 rows: early stopping on them picked worse weights than
    # training on every row (mean ROC-AUC 0.9938 against 0.9975 for ae on digits)
    rng = np.random.default_rng(0)
    few, many = rng.random((150, 6)), rng.random((200, 6))
    small_fit = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(few)
    assert small_fit.validation_fraction_ == 0.0
    assert "val_loss" not in small_fit.history_.epochs[-1]
    large_fit = aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(many)
    assert large_fit.validation_fraction_ == pytest.approx(0.1)
    assert "val_loss" in large_fit.history_.epochs[-1]
    given = aecore.AnomalyDetector("ae", epochs=2, random_state=0, validation_fraction=0.1)
    assert given.fit(few).validation_fraction_ == pytest.approx(0.1)
    for bad in ("half", None, 1.0):
        with pytest.raises(ConfigError, match=r"must be 'auto' or a number in \[0, 1\); got"):
            aecore.AnomalyDetector(validation_fraction=bad).fit(few)
    # a setting that needs validation named the user's 'auto' as "validation_fraction=0"
    with pytest.warns(IgnoredSettingWarning) as caught:
        aecore.AnomalyDetector("ae", epochs=2, patience=1, random_state=0).fit(few)
    said = " ".join(str(w.message) for w in caught)
    assert "validation_fraction='auto', which holds out none of 150 rows" in said
    assert "validation_fraction=0" not in said


def test_the_anomaly_benchmark_reports_both_libraries(tmp_path, capsys):
    from aecore_benchmarks import anomaly

    report = tmp_path / "anomaly.json"
    argv = ["--datasets", "digits", "--classes", "2", "--epochs", "2", "--models", "ae",
            "--pyod", "KNN", "--seeds", "0,1", "--json", str(report)]  # fmt: skip
    assert anomaly.main(argv) == 0
    rows = {(r["model"], r["input"]): r for r in json.loads(report.read_text())["rows"]}
    assert all(0.5 <= r["mean_auc"] <= 1.0 for r in rows.values())
    # a seeded detector runs once per seed and class; one that draws nothing, once a class
    assert rows["ae", "raw"]["seeds"] == [0, 1] and len(rows["ae", "raw"]["aucs"]) == 4
    if ("KNN", "raw") in rows:  # PyOD installed: on the rows as given and standardized
        for given in ("raw", "standardized"):
            assert rows["KNN", given]["seeds"] == [None] and len(rows["KNN", given]["aucs"]) == 2
        assert rows["KNN", "raw"]["aucs"] != rows["KNN", "standardized"]["aucs"]
    assert "mean AUC" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        anomaly.main(["--seeds", "one"])
    assert "expected a non-negative int, got 'one'" in capsys.readouterr().err


def test_the_default_code_is_narrower_than_the_data():
    # latent_dim 8 on 6 features let an ae copy its input: every row scored ~1e-14 and
    # the ROC-AUC fell to 0.62 (1.0 with 2 units)
    for n_features, want in [(6, 3), (1, 1), (13, 8)]:
        X = np.random.default_rng(0).normal(size=(60, n_features))
        detector = aecore.AnomalyDetector("ae", epochs=1, random_state=0).fit(X)
        assert detector.model_.latent_dim == want
    with pytest.raises(ConfigError, match="latent_dim must be 'auto' or a positive int"):
        aecore.AnomalyDetector(latent_dim="wide").fit(X)


def test_the_detector_thresholds_the_score_kind_asked_for(tmp_path):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X[y == 0] / 16.0
    with pytest.raises(ConfigError, match="score_kind must be one of denoising's score kinds"):
        aecore.AnomalyDetector(score_kind="elbo").fit(X)  # refused before training
    detector = aecore.AnomalyDetector(
        score_kind="denoising", epochs=2, random_state=0, cross_fit=0
    ).fit(X)  # the model's own scores of its training rows
    model = detector.model_.double()
    x = torch.from_numpy(detector.normalization_.apply(X)).double()
    want = model.score(x, kind="denoising").numpy()
    assert detector.detector_.kind == "denoising"
    np.testing.assert_allclose(detector.decision_scores_, want, rtol=1e-6)
    assert aecore.AnomalyDetector().get_params()["score_kind"] is None


def test_a_detector_whose_training_rows_all_score_alike_says_so():
    # one feature, a code of one: the ae learnt the identity, scored every row 0, and
    # flagged none of the contamination share, nor a new row at 1e3, without a word
    x = np.random.default_rng(0).normal(size=(200, 1))
    with pytest.warns(UserWarning, match="every training row scores the same.*a code of 1 copies"):
        aecore.AnomalyDetector("ae", epochs=2, random_state=0).fit(x)
    # the remedies it names work (a smaller latent_dim, once advised, does not exist)
    far = np.array([[0.0], [100.0]])
    for remedy in ({"model": "vae"}, {"model": "denoising", "score_kind": "denoising"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            fitted = aecore.AnomalyDetector(**remedy, epochs=5, random_state=0).fit(x)
        assert list(fitted.predict(far)) == [0, 1], remedy
    # the denoising model is not told to use itself; one row is named as the cause
    with pytest.warns(UserWarning, match="smaller latent_dim\\)$"):
        aecore.AnomalyDetector(epochs=2, random_state=0).fit(np.ones((50, 3)))
    with pytest.warns(UserWarning, match="there is one training row"):
        aecore.AnomalyDetector(epochs=2, random_state=0).fit(x[:1])


def test_asking_an_export_for_a_kind_it_lacks_says_how_to_get_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from aecore.errors import DataError
    from aecore.runtime import OnnxAutoencoder

    model = aecore.create("denoising", input_shape=(6,), latent_dim=2)
    aecore.save(model, tmp_path / "m")
    aecore.export_onnx(tmp_path / "m", tmp_path / "m.onnx", part="all")
    with pytest.raises(DataError, match=r"AnomalyDetector\(score_kind='denoising'\)"):
        OnnxAutoencoder(tmp_path / "m.onnx").score(np.zeros((2, 6), np.float32), kind="denoising")


def test_a_fitted_detector_scores_by_the_kind_its_threshold_was_fitted_on():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X[y == 0] / 16.0
    detector = aecore.AnomalyDetector(epochs=2, random_state=0, cross_fit=0).fit(X)
    detector.set_params(score_kind="denoising")  # takes effect at the next fit
    np.testing.assert_allclose(detector.decision_function(X), detector.decision_scores_)
    old = pickle.loads(pickle.dumps(detector))
    del old.score_kind  # pickled before score_kind existed
    restored = pickle.loads(pickle.dumps(old))
    assert restored.score_kind is None
    np.testing.assert_array_equal(restored.predict(X), detector.labels_)


@parametrize_with_checks([aecore.AnomalyDetector(epochs=1, random_state=0)])
def test_the_detector_passes_scikit_learns_checks(estimator, check):
    # it does not claim scikit-learn's outlier-detector type: its predict gives PyOD's
    # labels (1 = outlier), which scikit-learn's outlier checks would read the other way
    check(estimator)


def test_the_detector_is_not_tagged_as_scikit_learns_outlier_detector():
    from sklearn.base import is_outlier_detector

    assert not is_outlier_detector(aecore.AnomalyDetector())
    assert is_outlier_detector(aecore.AutoencoderTransformer())  # its -1 / +1 predict
