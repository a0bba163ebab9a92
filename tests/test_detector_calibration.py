"""The detector's threshold on new rows: cross-fitted training scores, ties, the
"unify" moments, and fits that fail leaving the fitted estimator as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_sklearn import one_torch_thread  # noqa: F401  (one torch thread, module-wide)

import aecore
from aecore.detection import MAX_KEPT_SCORES, ScoreThreshold
from aecore.errors import ConfigError, DataError
from aecore.sklearn import AutoencoderTransformer


def _digit_split(digit=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X[y == digit] / 16.0, test_size=0.3, random_state=0)


def test_the_threshold_holds_on_new_normal_rows():
    # thresholded on its own training scores, a detector trained on 124 rows of one digit
    # flagged most new rows of that digit at contamination=0.1; out-of-fold scores do not
    train, new = _digit_split()
    own = aecore.AnomalyDetector(random_state=0, cross_fit=0).fit(train)
    crossed = aecore.AnomalyDetector(random_state=0).fit(train)
    assert own.validation_fraction_ == crossed.validation_fraction_ == 0.0
    assert own.predict(new).mean() > 0.3
    assert crossed.predict(new).mean() <= 0.2
    # the model is the fit on every row either way; the training labels keep PyOD's share
    np.testing.assert_array_equal(own.decision_function(new), crossed.decision_function(new))
    assert abs(crossed.labels_.mean() - 0.1) < 0.02
    assert np.array_equal(crossed.labels_, crossed.decision_scores_ > crossed.threshold_)


def test_cross_fit_is_checked_before_training():
    train, _ = _digit_split()
    for bad in ("yes", 1, -2, 2.5, True):
        with pytest.raises(ConfigError, match="cross_fit must be 'auto', 0 or at least 2"):
            aecore.AnomalyDetector(cross_fit=bad).fit(train)
    with pytest.raises(DataError, match="cross_fit=5 needs at least 10 rows"):
        aecore.AnomalyDetector(cross_fit=5).fit(train[:9])
    detector = aecore.AnomalyDetector(epochs=2, random_state=0)
    assert detector._folds(len(train)) == 2 and detector._folds(19) == 0  # 19: too few


def test_rows_held_out_for_early_stopping_do_not_calibrate_the_threshold():
    # early stopping on held-out rows once stood in for cross-fitting: trained on 630
    # rows of digits 0-4, ae flagged 45% of new ones at contamination=0.1
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    train, new = train_test_split(X[y < 5] / 16.0, test_size=0.3, random_state=0)
    detector = aecore.AnomalyDetector("ae", random_state=0).fit(train)
    assert detector.validation_fraction_ > 0
    assert 0.0 < detector.predict(new).mean() <= 0.2


def test_scores_that_tie_flag_no_row():
    # rounding noise among equal scores once decided which 10% were flagged
    scores = 1.0 + np.random.default_rng(0).normal(size=200) * 1e-15
    threshold = ScoreThreshold.fit(scores, 0.1)
    assert threshold.labels(scores).sum() == 0
    assert threshold.labels(np.array([2.0]))[0] == 1
    spread = ScoreThreshold.fit(np.arange(200.0), 0.1)
    assert spread.labels(np.arange(200.0)).sum() == 20


def test_unify_uses_every_training_score_beyond_the_kept_quantiles():
    scores = np.random.default_rng(1).lognormal(size=MAX_KEPT_SCORES + 9999)
    threshold = ScoreThreshold.fit(scores, 0.1)
    assert len(threshold.kept_scores) == MAX_KEPT_SCORES
    new = np.array([0.5, 2.0, 8.0])
    from math import erf, sqrt

    want = [max(0.0, erf((s - scores.mean()) / (scores.std() * sqrt(2)))) for s in new]
    np.testing.assert_allclose(threshold.proba(new, "unify")[:, 1], want, rtol=1e-12)
    again = ScoreThreshold.from_dict(threshold.to_dict())
    np.testing.assert_array_equal(again.proba(new, "unify"), threshold.proba(new, "unify"))
    saved_before = {k: v for k, v in threshold.to_dict().items() if k != "moments"}
    older = ScoreThreshold.from_dict(saved_before)  # kept quantiles' moments, as then
    assert older.moments is None and np.isfinite(older.proba(new, "unify")).all()
    with pytest.raises(DataError, match="moments .* are not a mean and a standard deviation"):
        ScoreThreshold.from_dict({**threshold.to_dict(), "moments": [0.0, -1.0]})
    with pytest.raises(DataError, match="malformed detector threshold"):
        ScoreThreshold.from_dict({**threshold.to_dict(), "moments": "wide"})


def test_a_fit_that_fails_leaves_the_fitted_detector_working():
    train, new = _digit_split()
    detector = aecore.AnomalyDetector(epochs=2, random_state=0).fit(train)
    labels, proba = detector.predict(new), detector.predict_proba(new)
    broken = train.copy()
    broken[3, 5] = np.nan
    with pytest.raises(ValueError):
        detector.fit(broken)
    np.testing.assert_array_equal(detector.predict(new), labels)
    np.testing.assert_array_equal(detector.predict_proba(new), proba)
    np.testing.assert_array_equal(detector.predict_confidence(new).shape, (len(new),))


def test_a_fit_that_fails_leaves_the_fitted_transformer_working():
    from sklearn.datasets import load_iris, load_wine

    wine, iris = load_wine().data, load_iris().data
    est = AutoencoderTransformer(epochs=2, random_state=0).fit(wine)
    codes = est.transform(wine)
    with pytest.raises(ConfigError):
        est.set_params(latent_dim=0).fit(iris)
    assert est.n_features_in_ == 13
    np.testing.assert_array_equal(est.transform(wine), codes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.set_params(latent_dim=2).fit(iris)  # and a good refit goes through
    assert est.n_features_in_ == 4


@pytest.mark.parametrize("name", ["rbm", "vae"])
def test_each_fold_is_made_as_the_fit_on_every_row(name):
    # one value beyond [0, 1] gave the full model Gaussian units and standardised rows;
    # the fold without it chose Bernoulli units and raw rows, and its scores, in other
    # units, set the threshold: 27% (rbm) of new normal rows flagged at 0.1
    rng = np.random.RandomState(0)
    X = 0.05 + 0.9 * rng.rand(80, 6)
    X[0, 0] = 1.3
    new = 0.05 + 0.9 * rng.rand(4000, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = aecore.AnomalyDetector(name, epochs=20, random_state=1, cross_fit=2).fit(X)
    assert detector.normalization_.kind == "standardize"
    assert detector.predict(new).mean() <= 0.12


def test_a_detector_pickled_before_cross_fit_clones_and_refits():
    import pickle

    from sklearn.base import clone

    train, new = _digit_split()
    detector = aecore.AnomalyDetector(epochs=2, random_state=0).fit(train)
    del detector.cross_fit  # as pickled before it was a parameter
    old = pickle.loads(pickle.dumps(detector))
    assert old.get_params()["cross_fit"] == 0 and "cross_fit=0" in repr(old)
    np.testing.assert_array_equal(old.predict(new), detector.predict(new))
    clone(old).fit(train)


def test_the_pipelines_threshold_is_fitted_on_rows_the_model_did_not_train_on():
    # `aecore train ae --data digits --contamination 0.1` thresholded the training rows'
    # scores, and flagged 37% of the test rows
    import torch

    from aecore import pipeline

    result = pipeline.train("ae", "digits", None, contamination=0.1, epochs=60, progress=False)
    assert result.metrics["threshold_rows"] == "val"
    rows = result.prepared.view("test")
    scores = result.model.score(torch.as_tensor(rows[np.arange(len(rows))])).numpy()
    assert (scores > result.model.detector.threshold).mean() <= 0.2
    # without validation rows: the training rows', said
    with pytest.warns(UserWarning, match=r"fitted on the training rows.*there are 0: raise"):
        bare = pipeline.train("ae", "digits", None, contamination=0.1, epochs=1,
                              val_fraction=0.0, progress=False)  # fmt: skip
    assert bare.metrics["threshold_rows"] == "train"


def test_each_fold_stops_early_as_the_fit_on_every_row_did(monkeypatch):
    # on 300 rows "auto" holds out 30 for early stopping; each fold's 150 would hold out
    # none by the same rule, and the folds trained unlike the model they stand in for
    from aecore import anomaly

    folds = []
    real_clone = anomaly.clone
    monkeypatch.setattr(anomaly, "clone", lambda est: folds.append(real_clone(est)) or folds[-1])
    X = np.random.default_rng(0).random((300, 6))
    detector = aecore.AnomalyDetector("ae", epochs=3, random_state=0).fit(X)
    assert detector.validation_fraction_ == 0.1
    assert len(folds) == 2 and all(f.validation_fraction_ == 0.1 for f in folds)
