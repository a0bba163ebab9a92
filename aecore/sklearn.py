"""scikit-learn estimator around any registered aecore model, for tabular data.

``AutoencoderTransformer`` fits a registry model on ``X`` of shape (n_samples,
n_features) and then works as a transformer (``transform`` gives codes,
``inverse_transform`` decodes back to the data's units) and as an outlier detector
(``score_samples`` is the negative of the model's per-sample anomaly score: the
reconstruction error, or the model's own such as an RBM's free energy; ``predict`` flags
the ``contamination`` share of the training rows that score worst as -1), so it
slots into ``Pipeline`` and ``GridSearchCV``. Needs scikit-learn >= 1.6.

Model hyperparameters go in as extra keywords (``hidden=[64]``); ``get_params`` and
``set_params`` list and accept them next to the estimator's own parameters, so
``clone`` and a grid over an hparam work.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

try:
    from sklearn.base import (
        BaseEstimator,
        ClassNamePrefixFeaturesOutMixin,
        OutlierMixin,
        TransformerMixin,
    )
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_array, check_is_fitted, validate_data
except ImportError as exc:  # missing, or older than 1.6 (no validate_data)
    raise ImportError(
        f"aecore.sklearn needs scikit-learn >= 1.6 (pip install 'aecore[sklearn]'): {exc}"
    ) from exc

from aecore import params
from aecore.config import TrainConfig
from aecore.data.frames import check_numeric_columns
from aecore.data.units import (
    check_in_model_range,
    data_units,
    error_scale,
    fit_normalization,
    hparams_for_units,
)
from aecore.detection import row_list
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.estimator_params import ModelHyperparameters
from aecore.registry import check_hyperparameters, create, hyperparameter_names, model_class
from aecore.training import Trainer

_FLOATS = [np.float64, np.float32]
#: the training defaults the estimator shares with Trainer and ``aecore train``
_DEFAULTS = TrainConfig()
_CHUNK_ROWS = 4096  # rows per forward pass at inference, to bound memory
_SEED_BOUND = 2**31 - 1


#: the hyperparameter names of a registered model (kept here for older imports)
model_hparam_names = hyperparameter_names


class AutoencoderTransformer(
    ModelHyperparameters,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    OutlierMixin,
    BaseEstimator,
):
    """An aecore autoencoder as a scikit-learn transformer and outlier detector.

    Parameters
    ----------
    model : str, default="ae"
        Registry name of the model (``aecore models`` lists them). It must accept
        vector inputs: ``input_shape=(n_features,)``.
    latent_dim : int, default=2
        Size of the code ``transform`` returns.
    epochs : int, default=TrainConfig.epochs (50)
        Training epochs (fewer when early stopping ends the run).
    batch_size : int, default=TrainConfig.batch_size (64)
    lr : float or None, default=None
        Learning rate: of the trainer's optimizer (None: the model's ``default_lr``), or, for
        a model that updates its own parameters and has an ``lr`` hyperparameter
        (``rbm``), that hyperparameter (None: the model's default).
    normalize : {"auto", "standardize", "minmax", "none"}, default="auto"
        Normalisation fitted on ``X`` in ``fit``: a named one per feature. ``"auto"``
        (``aecore.data.units``): data whose every value lies in [0, 1] (pixels,
        probabilities) is kept as it is, since per-feature rescaling would blow up
        features that barely vary. Data whose features share one scale (no feature's
        range over 4x the median range: pixel counts, lengths in one unit) keeps their
        relative sizes: min-max scaled as a whole for models that need inputs in [0, 1],
        else centred per feature and divided by one scale. Otherwise the features are in
        units of their own and each is rescaled on its own (standardised, or min-max
        scaled for models that need [0, 1]), so no result depends on the unit a feature
        is recorded in. On real-valued data (neither in [0, 1] nor intensities from zero
        such as pixel counts) a model with Bernoulli units that offers Gaussian ones (the
        ``vae``'s decoder, the ``rbm``'s and ``deep``'s visible units: its
        ``real_valued_hparams``) gets those, unless the given hyperparameters choose
        otherwise. A model that declares its own (``default_normalize``: the SAEs keep
        activations as they are) gets it. The model trains and scores in normalised units,
        new rows clipped to its input range (scores charge what lies beyond);
        ``inverse_transform`` gives data units.
    contamination : float in (0, 0.5], default=0.1
        Share of the training rows ``predict`` flags as outliers: ``offset_`` is
        that percentile of the training ``score_samples``.
    validation_fraction : float in [0, 1), default=TrainConfig.val_fraction (0.1)
        This share of the rows (drawn from ``random_state``) is held out: training
        stops early and keeps the best weights as judged on it (see ``aecore.Trainer``).
        0 trains on every row (and keeps the final weights unless the start did better).
        ``validation_fraction_`` after ``fit`` is the fraction used.
    patience : int or None, default=TrainConfig.patience (20)
        Early-stopping patience in epochs.
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, batch order and noise. An int gives the same
        fitted model on every fit; None draws a seed from numpy's global RNG.
    device : str, default="cpu"
        Where to train: "cpu", "cuda", "cuda:N" or "auto". Inference runs on CPU.
    **hparams
        Hyperparameters of the model, e.g. ``hidden=[64]`` for ``ae``.

    Attributes
    ----------
    model_ : aecore.Autoencoder
        The trained model (on CPU, in eval mode), its ``normalization`` set.
    normalization_ : aecore.Normalization
        The normalisation fitted on ``X``.
    history_ : aecore.History
        Per-epoch training metrics.
    n_iter_ : int
        Epochs run.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names.
    """

    def __init__(
        self,
        model: str = "ae",
        *,
        latent_dim: int = 2,
        epochs: int = _DEFAULTS.epochs,
        batch_size: int = _DEFAULTS.batch_size,
        lr: float | None = None,
        normalize: str = "auto",
        contamination: float = 0.1,
        validation_fraction: float = _DEFAULTS.val_fraction,
        patience: int | None = _DEFAULTS.patience,
        random_state=None,
        device: str = "cpu",
        **hparams: Any,
    ) -> None:
        self.model = model
        self.latent_dim = latent_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.normalize = normalize
        self.contamination = contamination
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.random_state = random_state
        self.device = device
        # private, so scikit-learn's checks do not take them for fitted state
        self._hparams = hparams

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # codes come back in the input's float dtype (trained in float32, evaluated in
        # float64 so that a row's result does not depend on the batch it came in)
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.non_deterministic = False  # a fixed random_state gives the same fit
        return tags

    # -- fitting ---------------------------------------------------------------------
    def fit(self, X, y=None) -> AutoencoderTransformer:
        """Fit the normalisation and train the model on ``X``; ``y`` is ignored. A fit
        that fails leaves the estimator as it was: a fitted one still works."""
        before = dict(self.__dict__)
        try:
            return self._fit(X)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(self, X) -> AutoencoderTransformer:
        check_numeric_columns(X, "X")
        X = validate_data(self, X, dtype=_FLOATS)
        contamination = params.number(
            "contamination", self.contamination, low=0.0, high=0.5, low_open=True
        )
        normalize = params.choice(
            "normalize", self.normalize, ["auto", "standardize", "minmax", "none"]
        )
        hparams = self._model_hparams(model_class(self.model))
        # a cross-fit fold (AnomalyDetector) keeps the full fit's normalisation
        fold_of = self.__dict__.pop("_fold_of", None)
        declared = getattr(model_class(self.model), "default_normalize", None)
        if normalize == "auto" and declared is not None:
            normalize = declared  # the SAEs: activations keep their geometry
        units = data_units(X) if normalize == "auto" and fold_of is None else None
        if units is not None:
            hparams = hparams_for_units(model_class(self.model), units, hparams)
        validation_fraction, stated = self._validation_fraction(len(X))
        seed = self._seed()
        trainer_lr = None if "lr" in hparams else self.lr
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=trainer_lr,
                             seed=seed, device=self.device, patience=self.patience,
                             val_fraction=validation_fraction)  # fmt: skip
        names = {"val_fraction": "validation_fraction", "grad_clip": None}  # in its messages
        values = {"val_fraction": stated} if stated else {}
        trainer = Trainer(config, progress=False, setting_names=names, setting_values=values)

        # seeded model construction without touching the caller's global torch RNG
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            net = create(
                self.model,
                input_shape=(X.shape[1],),
                latent_dim=self._latent_dim(X.shape[1]),
                **hparams,
            )
            normalization = (
                fit_normalization(net.input_range, normalize, units, X)
                if fold_of is None
                else fold_of
            )
            # apply() may hand back X itself (a read-only memory map, say): torch
            # wants memory it may write
            x = np.require(normalization.apply(X), requirements=["C", "W"])
            if x.size:
                check_in_model_range(net.input_range, x.min(), x.max(), normalize, self.model)
            net.normalization = normalization
            if hasattr(self, "feature_names_in_"):  # saved and served with the model
                net.feature_names = [str(n) for n in self.feature_names_in_]
            history = trainer.fit(net, torch.from_numpy(x))
        net.cpu().eval()

        self.model_ = net
        self.normalization_ = normalization
        self.history_ = history
        self.n_iter_ = len(history.epochs)
        self._n_features_out = net.latent_dim
        # the fraction used: none where the hold-out of so few rows came out empty
        validated = any("val_loss" in e for e in history.epochs)
        self.validation_fraction_ = validation_fraction if validated else 0.0
        self._error_scale = error_scale(np.asarray(X, dtype=np.float64))
        self._set_thresholds(self._training_scores(X, x, seed), contamination)
        return self

    def _training_scores(self, X: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
        """The training rows' ``score_samples`` that the threshold is set over (``X`` as
        given, ``x`` normalised; ``seed`` the fit's)."""
        return self._scores(x)

    def _set_thresholds(self, scores: np.ndarray, contamination: float) -> None:
        """The outlier threshold from the training rows' ``score_samples``."""
        self.offset_ = float(np.percentile(scores, 100.0 * contamination))

    def _model_hparams(self, model_cls: type) -> dict[str, Any]:
        """The keywords for the model: ``hparams`` checked by name, plus ``lr`` for a
        model that updates its own parameters with its own learning rate."""
        if 1 not in model_cls.input_ranks:
            raise ConfigError(
                f"{type(self).__name__} takes tabular rows, (n_samples, n_features), and "
                f"{self.model!r} takes images (C, H, W): use a vector model, or train this "
                f"one with aecore.Trainer / aecore train"
            )
        if "input_shape" in self._hparams:
            raise ConfigError("input_shape comes from X's columns, not from the keywords")
        own = self._get_param_names()
        check_hyperparameters(self.model, model_cls, self._hparams, own, type(self).__name__)
        allowed = hyperparameter_names(model_cls)
        hparams = dict(self._hparams)
        if self.lr is not None and not model_cls.uses_optimizer and "lr" in (allowed or ()):
            hparams["lr"] = self.lr
        return hparams

    def _seed(self) -> int:
        """The trainer's seed: ``random_state`` itself when it is an int."""
        if isinstance(self.random_state, (int, np.integer)) and not isinstance(
            self.random_state, bool
        ):
            # the trainer's seed range, named by the estimator's parameter
            return params.integer("random_state", int(self.random_state), low=0, high=2**32 - 1)
        return int(check_random_state(self.random_state).randint(_SEED_BOUND))

    def _latent_dim(self, n_features: int) -> Any:
        """The code size of the model fit builds (``create`` checks it)."""
        return self.latent_dim

    def _validation_fraction(self, n_rows: int) -> tuple[float, str | None]:
        """The fraction fit holds out, and how messages state it where fit chose the
        number (None: as the number)."""
        # named by the estimator's parameter, not TrainConfig's field, in the error
        fraction = params.number(
            "validation_fraction", self.validation_fraction, low=0.0, high=1.0, high_open=True
        )
        return fraction, None

    # -- inference -------------------------------------------------------------------
    def _normalized(self, X, clip: bool = True) -> tuple[np.ndarray, np.dtype]:
        check_is_fitted(self)
        check_numeric_columns(X, "X")
        X = validate_data(self, X, dtype=_FLOATS, reset=False)
        with np.errstate(over="ignore"):
            x = self.normalization_.apply(X)
        # float32 overflow would score the row NaN or inf; a served model (an export that
        # takes data units) refuses values beyond float32 before normalising, and so here
        overflow = ~np.isfinite(x).all(1) | (np.abs(X) > np.finfo(np.float32).max).any(1)
        if overflow.any():
            raise DataError(
                f"X has values beyond float32's range, or that overflow it once normalised "
                f"(rows {row_list(overflow)}): the model computes in float32; rescale or "
                f"drop them"
            )
        bounds = self.model_.input_range
        if clip and bounds is not None:  # beyond the training range: the model's range holds
            x = np.clip(x, *bounds)
        return x, X.dtype

    @torch.no_grad()
    def _chunks(self, method: str, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        """``model_.<method>`` over row chunks, computed in float64: float32 matrix
        products round differently for different batch sizes, and a row's result
        must not depend on which other rows came with it."""
        fn = getattr(copy.deepcopy(self.model_).double().eval(), method)
        # (inverse_transform's codes come as given: a read-only view of a DataFrame's)
        x = np.require(x, dtype=np.float64, requirements=["C", "W"])
        out = [
            fn(torch.from_numpy(x[i : i + _CHUNK_ROWS]), **kwargs).numpy()
            for i in range(0, len(x), _CHUNK_ROWS)
        ]
        return np.concatenate(out)

    def _scores(self, x: np.ndarray, kind: str | None = None) -> np.ndarray:
        # the model's per-sample anomaly score (None: its default kind), negated
        return -self._chunks("score", x, kind=kind)

    def transform(self, X) -> np.ndarray:
        """Codes of ``X``: (n_samples, latent_dim), in ``X``'s float dtype."""
        x, dtype = self._normalized(X)
        return self._chunks("encode", x).reshape(len(x), -1).astype(dtype)

    def inverse_transform(self, X) -> np.ndarray:
        """Decode codes (n_samples, latent_dim) to rows in the data's units."""
        check_is_fitted(self)
        z = check_array(X, dtype=_FLOATS)
        if z.shape[1] != self.model_.latent_dim:
            raise ShapeError(
                f"X has {z.shape[1]} features, but {type(self).__name__}.inverse_transform "
                f"is expecting {self.model_.latent_dim} (latent_dim) features as input"
            )
        decoded = self._chunks("decode", z)
        decoded = decoded.reshape(len(z), self.n_features_in_)
        return self.normalization_.invert(decoded, dtype=np.float64).astype(z.dtype)

    def score_samples(self, X) -> np.ndarray:
        """The negative of the model's per-sample anomaly score (``model_.score``: its
        default kind, the reconstruction error in normalised units unless the model has
        a better one, e.g. an RBM's free energy): higher is more normal; lower the farther
        a row lies beyond the model's input range (``Autoencoder.score``)."""
        x, _ = self._normalized(X, clip=False)
        return self._scores(x)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for outliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """+1 for inliers, -1 for outliers (decision_function below 0)."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def score(self, X, y=None) -> float:
        """The negative mean squared reconstruction error in units of the training rows'
        standard deviation (each feature's own for features in units of their own, one
        for all where they share a scale), so ``GridSearchCV`` without a scorer prefers
        models that reconstruct held-out rows better: the units are the same for every
        model and ``normalize`` (each fit's normalised units are not: "auto"
        standardises for one model, min-max scales for another), unlike
        ``score_samples``'s default kind (an RBM's free energy leaves out its partition
        function, so it does not compare models)."""
        x, _ = self._normalized(X, clip=False)
        if not hasattr(self, "_error_scale"):  # pickled before it was kept: as then
            return float(np.mean(self._scores(x, kind="reconstruction")))
        bounds = self.model_.input_range
        inside = x if bounds is None else np.clip(x, *bounds)
        restored = self._chunks("forward", inside).reshape(len(x), -1)
        invert = self.normalization_.invert  # against the rows as given, as score_samples
        error = (invert(restored, np.float64) - invert(x, np.float64)) / self._error_scale
        return -float(np.mean(error**2))
