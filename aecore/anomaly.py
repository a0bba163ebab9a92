"""``AnomalyDetector``: an aecore autoencoder as an anomaly detector with PyOD's
conventions, for pipelines that already speak them.

After ``fit(X)``: ``decision_scores_`` (the training rows' anomaly scores, higher = more
anomalous: the model's default ``score`` in normalised units, e.g. the reconstruction
error; cross-fitted, see ``cross_fit``), ``threshold_`` (the
``contamination`` share of them lies above it) and ``labels_`` (1 = outlier). Then
``decision_function``, ``predict`` (0 / 1), ``predict_proba(method="linear" | "unify")``
and ``predict_confidence`` on new rows. The threshold travels with the model:
``aecore.save(detector.model_, DIR)`` writes it into ``model.json``, ``aecore export``
into the ONNX metadata, and a loaded folder (``aecore.runtime``'s numpy interface) or
``aecore.runtime.OnnxAutoencoder`` offers the same four methods without torch.

Everything else (the model, ``normalize``, training settings, ``transform``) is
``aecore.sklearn.AutoencoderTransformer``'s (data already in [0, 1], such as pixels, is
kept as it is by default, features in units of their own are each rescaled), with
detection's own defaults for the model, code size and epochs (see the class).
``score_samples`` keeps scikit-learn's sign (higher = more normal), as does ``score``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_is_fitted

from aecore import params
from aecore.detection import DetectorMethods, ScoreThreshold, tied
from aecore.errors import ConfigError, DataError, warn
from aecore.registry import model_class
from aecore.sklearn import _DEFAULTS, AutoencoderTransformer

#: the fewest rows ``validation_fraction="auto"`` holds out to judge epochs by
MIN_HOLD_OUT_ROWS = 20
#: ``latent_dim="auto"``'s code size, on data with more features than this
AUTO_LATENT_DIM = 8
#: ``cross_fit="auto"``'s folds, and the fewest rows it cross-fits
AUTO_FOLDS, MIN_CROSS_FIT_ROWS = 2, 20


class AnomalyDetector(DetectorMethods, AutoencoderTransformer):
    """PyOD-style anomaly detector on any aecore vector model (see the module's
    docstring); the parameters are ``AutoencoderTransformer``'s, with defaults chosen
    for detection: the ``denoising`` model with an 8-unit code (``latent_dim="auto"``: 8,
    or half the features on data with 8 or fewer, so that a model cannot copy its input
    and score every row alike; one feature keeps a code of 1), trained for 100 epochs
    (on the one-class benchmark, mean ROC-AUC over seeds 0-2 of 0.997 on digits, 0.921 on
    breast cancer and 0.991 on wine, where the transformer's defaults, ``ae`` with a
    2-unit code for 50 epochs, reach 0.989, 0.901 and 0.979 with seed 0; a denoiser
    cannot learn the identity, so an 8-unit code also suits data with fewer features),
    and ``validation_fraction="auto"``: 0.1 of the rows held out for early stopping where
    that is at least ``MIN_HOLD_OUT_ROWS``, else none (``validation_fraction_`` after
    ``fit`` says which). ``score_kind``: the model's score the detector thresholds (one
    of its ``score_kinds``, e.g. ``"free_energy"`` for the ``rbm``, ``"denoising"`` for
    the denoiser); None: its ``default_score_kind``.

    ``cross_fit``: the folds that score the training rows the threshold is set over.
    A model scores the rows it trained on lower than new ones, most on small data where
    nothing stops it early: thresholded on its own training scores, the default
    detector flagged 25-78% of new normal rows of a digit or a wine cultivar at
    ``contamination=0.1``. With K folds, each row is scored by a model fitted (as this
    one is) on the other folds, as PyOD's KNN scores each row without itself: 0-13% on
    those (2 folds; 0-19% with 3). Rows held out for early stopping do not prevent it:
    trained on 630 rows of digits 0-4, ``ae`` flagged 45% of new ones on its own scores,
    4% cross-fitted. ``"auto"``: ``AUTO_FOLDS`` folds where there are at least
    ``MIN_CROSS_FIT_ROWS`` rows; 0: the model's scores of its own training rows. It
    costs K more fits, each on (K - 1) / K of the rows; ``model_`` is the fit on every
    row either way."""

    def __init__(
        self,
        model: str = "denoising",
        *,
        latent_dim: int | str = "auto",
        epochs: int = 100,
        batch_size: int = _DEFAULTS.batch_size,
        lr: float | None = None,
        normalize: str = "auto",
        contamination: float = 0.1,
        validation_fraction: float | str = "auto",
        patience: int | None = _DEFAULTS.patience,
        random_state=None,
        device: str = "cpu",
        score_kind: str | None = None,
        cross_fit: int | str = "auto",
        **hparams: Any,
    ) -> None:
        super().__init__(
            model, latent_dim=latent_dim, epochs=epochs, batch_size=batch_size, lr=lr,
            normalize=normalize, contamination=contamination,
            validation_fraction=validation_fraction, patience=patience,
            random_state=random_state, device=device, **hparams,
        )  # fmt: skip
        self.score_kind = score_kind
        self.cross_fit = cross_fit

    def fit(self, X, y=None) -> AnomalyDetector:
        """``AutoencoderTransformer.fit``, then the threshold over the training rows'
        scores of ``score_kind`` (checked before training), cross-fitted or not
        (``cross_fit``)."""
        return super().fit(X, y)

    def _fit(self, X) -> AnomalyDetector:
        self._kind(model_class(self.model))
        try:
            rows = int(X.shape[0]) if hasattr(X, "shape") else len(X)
        except (TypeError, IndexError):
            rows = 0  # not rows at all: validate_data names what is wrong
        self._folds(rows)  # checked before training
        self.__dict__.pop("detector_", None)  # a refit scores by its own score_kind
        return super()._fit(X)

    def _folds(self, n_rows: int) -> int:
        """The folds ``cross_fit`` asks of ``n_rows`` rows (0: none)."""
        value = self.cross_fit
        if isinstance(value, str) and value == "auto":
            return AUTO_FOLDS if n_rows >= MIN_CROSS_FIT_ROWS else 0
        try:
            folds = params.integer("cross_fit", value, low=0)
        except ConfigError:
            folds = 1
        if folds == 1:
            raise ConfigError(f"cross_fit must be 'auto', 0 or at least 2; got {value!r}")
        if 0 < n_rows < 2 * folds:
            raise DataError(
                f"cross_fit={folds} needs at least {2 * folds} rows (two per fold), got "
                f"{n_rows}; pass fewer folds, or 0 to threshold the model's scores of its "
                f"training rows"
            )
        return folds

    def _training_scores(self, X: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
        own = super()._training_scores(X, x, seed)
        folds = self._folds(len(X))
        if not folds or tied(-own):  # a model that copies its rows: say so, not fold biases
            return own
        # each fold as the fit on every row was made (its code size, the hyperparameters
        # the data's units chose, its normalisation), so their scores share its units
        config = {k: v for k, v in self.model_.get_config().items() if k != "input_shape"}
        scores = np.empty(len(X))
        for train, held in KFold(folds, shuffle=True, random_state=seed).split(X):
            # and its early stopping: on half the rows "auto" could hold out none
            fold = clone(self).set_params(
                cross_fit=0, validation_fraction=self.validation_fraction_, **config
            )
            fold._fold_of = self.normalization_
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fit on every row said what applies
                fold.fit(X[train])
            scores[held] = fold.score_samples(X[held])
        return scores

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # not scikit-learn's outlier detector: predict gives PyOD's labels (1 = outlier),
        # the reverse of scikit-learn's (-1 = outlier), which a tool trusting the tag reads
        tags.estimator_type = None
        return tags

    def _kind(self, cls: type | None = None) -> str:
        """The score the detector thresholds: ``score_kind``, checked against the model's
        (``cls``'s, before there is a model)."""
        model = self.model_ if cls is None else cls
        kinds = model.score_kinds
        if self.score_kind is None:
            return model.default_score_kind
        if self.score_kind not in kinds:
            raise ConfigError(
                f"score_kind must be one of {self.model}'s score kinds, "
                f"{', '.join(map(repr, kinds))}, or None; got {self.score_kind!r}"
            )
        return self.score_kind

    def _scores(self, x: np.ndarray, kind: str | None = None) -> np.ndarray:
        # after fit, the kind the threshold was fitted on (score_kind may have been set
        # since, or be missing from a detector pickled before it existed)
        if kind is None:
            fitted = self.__dict__.get("detector_")
            kind = fitted.kind if fitted is not None else self._kind()
        return super()._scores(x, kind)

    def _latent_dim(self, n_features: int) -> Any:
        # an ae with a code as wide as 6 features copied them: ROC-AUC 0.62 against 1.0
        # with 2 units
        if isinstance(self.latent_dim, str):
            if self.latent_dim != "auto":
                raise ConfigError(
                    f"latent_dim must be 'auto' or a positive int; got {self.latent_dim!r}"
                )
            return AUTO_LATENT_DIM if n_features > AUTO_LATENT_DIM else max(1, n_features // 2)
        return self.latent_dim

    def _validation_fraction(self, n_rows: int) -> tuple[float, str | None]:
        # a hold-out of a few rows cannot tell epochs apart: on 14 rows a class (digits)
        # or 5 (wine) early stopping picked worse weights than training on every row
        value = self.validation_fraction
        if isinstance(value, str) and value == "auto":
            held_out = round(_DEFAULTS.val_fraction * n_rows)
            if held_out >= MIN_HOLD_OUT_ROWS:
                return _DEFAULTS.val_fraction, f"'auto' ({_DEFAULTS.val_fraction:g})"
            return 0.0, (
                f"'auto', which holds out none of {n_rows} rows: fewer than "
                f"{MIN_HOLD_OUT_ROWS} held out cannot tell epochs apart"
            )
        if not isinstance(value, str):
            try:
                return super()._validation_fraction(n_rows)
            except ConfigError:
                pass
        raise ConfigError(
            f"validation_fraction must be 'auto' or a number in [0, 1); got {value!r}"
        )

    def _set_thresholds(self, scores: np.ndarray, contamination: float) -> None:
        # fit's training scores (score_samples: higher is more normal), scored once
        super()._set_thresholds(scores, contamination)
        anomaly = -scores.astype(np.float64)
        if tied(anomaly):
            if len(anomaly) == 1:
                why = "there is one training row: nothing tells a normal range"
            elif self.model_.latent_dim >= self.n_features_in_:  # no narrower code exists
                why = (
                    f"a code of {self.model_.latent_dim} copies {self.n_features_in_} "
                    f"feature(s) exactly: score by a density instead (model='vae' or 'rbm') "
                    f"or by restoring corrupted rows (model='denoising', "
                    f"score_kind='denoising')"
                )
            else:
                other = " or use the denoising model" if self.model != "denoising" else ""
                why = (
                    f"the rows are all alike, or {self.model!r} reproduces them exactly (a "
                    f"code as wide as the data's variation: give it a smaller latent_dim"
                    f"{other})"
                )
            warn(
                f"every training row scores the same ({anomaly[0]:.3g}), so the threshold "
                f"cannot flag a share of them and new rows score alike; {why}",
                UserWarning,
            )
        self.detector_ = ScoreThreshold.fit(anomaly, contamination, self._kind())
        self.model_.detector = self.detector_  # saved and exported with the model
        self.decision_scores_ = anomaly
        self.threshold_ = self.detector_.threshold
        self.labels_ = self.detector_.labels(anomaly)

    def _threshold(self) -> ScoreThreshold:
        check_is_fitted(self)
        if "detector" in vars(self.model_) and self.model_.detector is None:
            # the Trainer dropped it: model_ trained on, so its scores moved away from it
            raise DataError(
                "model_ was trained further after fit, which dropped its threshold (its "
                "scores moved): fit the detector again for one"
            )
        return self.detector_

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled when fit named the threshold ``detector`` (scikit-learn's convention:
        # what fit sets ends in an underscore)
        if "detector" in state:
            state.setdefault("detector_", state.pop("detector"))
        state.setdefault("score_kind", None)  # pickled before it was a parameter
        state.setdefault("cross_fit", 0)  # (then thresholds were not cross-fitted)
        super().__setstate__(state)

    def _anomaly_scores(self, X) -> np.ndarray:
        return -self.score_samples(X)
