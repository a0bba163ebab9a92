"""Anomaly scores to decisions, with PyOD's conventions: a score is higher for a more
anomalous row; a fitted detector keeps its training rows' scores, the contamination
threshold over them, and turns new scores into labels (1 = outlier), outlier
probabilities and confidences. numpy only: the torch-free runtime uses it too.

* ``proba(method="linear")``: the score min-max scaled by the training scores' range;
  ``"unify"``: ``max(0, erf((s - mean) / (std * sqrt(2))))`` over the training scores
  (Kriegel et al. 2011, "Interpreting and unifying outlier scores").
* ``confidence``: how sure the label is, given how many training scores lie below the
  score (Perini et al. 2020, ExCeeD): with ``c`` of ``n`` training scores at or below
  it, the chance that a row ranks above the contamination cut is
  ``P(Binomial(n, (1 + c) / (2 + n)) > n - max(1, floor(n * contamination)))``; for
  rows labelled inliers, one minus that. (PyOD counts no outlier below
  1/contamination rows, where every flagged row's confidence is then 0.)
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aecore.errors import ConfigError, DataError
from aecore.keywords import checked_keywords

PROBA_METHODS = ("linear", "unify")
#: training scores kept exactly up to this many; beyond, this many quantiles of them
MAX_KEPT_SCORES = 20_001
#: relative difference below which two scores of one row count as equal: a served model
#: computes in float32, the estimator in float64
SCORE_TOLERANCE = 1e-5


@dataclass(frozen=True, eq=False)
class ScoreThreshold:
    """A contamination threshold over training scores (see the module's docstring)."""

    contamination: float
    threshold: float
    #: ascending: the training scores, or evenly spaced quantiles of them
    kept_scores: np.ndarray
    #: training rows scored
    n: int
    #: the model's score the threshold is over (``Autoencoder.score``'s ``kind``)
    kind: str = "reconstruction"
    #: mean and standard deviation of all the training scores ("unify"'s); None in
    #: thresholds saved before they were kept: then those of ``kept_scores``
    moments: tuple[float, float] | None = None

    @classmethod
    def fit(cls, scores: Any, contamination: float, kind: str = "reconstruction") -> ScoreThreshold:
        if not (isinstance(contamination, (int, float)) and 0 < contamination <= 0.5):
            raise ConfigError(f"contamination must lie in (0, 0.5], got {contamination!r}")
        s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if len(s) == 0:
            raise DataError("a threshold needs at least one training score, got none")
        if not np.isfinite(s).all():
            raise DataError(
                f"{int((~np.isfinite(s)).sum())} of {len(s)} training scores are not finite"
            )
        threshold = float(np.percentile(s, 100.0 * (1.0 - contamination)))
        above = s[s > threshold]
        if tied(s):  # rounding would pick the rows flagged: none is
            threshold = float(s[-1]) + SCORE_TOLERANCE * abs(float(s[-1]))
        elif threshold in s and len(above):
            # on a training score, a served model's float32 rescoring of that row would
            # land a hair to either side: midway to the next score, no row's label moves
            threshold = 0.5 * (threshold + float(above[0]))
        kept = (
            s if len(s) <= MAX_KEPT_SCORES else np.quantile(s, np.linspace(0, 1, MAX_KEPT_SCORES))
        )
        moments = (float(np.mean(s)), float(np.std(s)))
        return cls(float(contamination), threshold, kept, len(s), kind, moments)

    # -- decisions ------------------------------------------------------------------------
    def labels(self, scores: Any) -> np.ndarray:
        """1 for outliers (score above the threshold), 0 for inliers."""
        return (self._scores(scores) > self.threshold).astype(np.int64)

    def proba(self, scores: Any, method: str = "linear") -> np.ndarray:
        """``(n, 2)``: the probabilities of inlier and outlier."""
        s = self._scores(scores)
        if method == "linear":
            lo, hi = float(self.kept_scores[0]), float(self.kept_scores[-1])
            p = (s - lo) / (hi - lo) if hi > lo else (s > hi).astype(np.float64)
        elif method == "unify":
            mean, std = self._moments()
            z = (
                (s - mean) / (std * math.sqrt(2.0))
                if std > 0
                else np.where(s > mean, np.inf, -np.inf)
            )
            p = _erf(z)
        else:
            raise ConfigError(f"method must be one of {', '.join(PROBA_METHODS)}, got {method!r}")
        p = np.clip(p, 0.0, 1.0)
        return np.column_stack([1.0 - p, p])

    def confidence(self, scores: Any) -> np.ndarray:
        """How sure each label is, in [0, 1] (ExCeeD)."""
        s = self._scores(scores)
        n = self.n
        # training scores at or below each score (from quantiles: in proportion); a
        # score within float32 rounding of a training score counts as at it, as a
        # served model's rescoring of that training row would not otherwise
        at = s + SCORE_TOLERANCE * np.abs(s)
        below = np.searchsorted(self.kept_scores, at, side="right") * (n / len(self.kept_scores))
        posterior = (1.0 + below) / (2.0 + n)
        # PyOD's expected outlier count floor(n * contamination), but at least one: with
        # fewer rows than 1/contamination it is 0, and every flagged row's confidence 0
        cut = n - max(1, math.floor(n * self.contamination))
        outlier = 1.0 - binomial_cdf(cut, n, posterior)
        return np.where(self.labels(s) == 1, outlier, 1.0 - outlier)

    # -- saving ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "contamination": self.contamination,
            "threshold": self.threshold,
            "n": self.n,
            "kind": self.kind,
            "kept_scores": [float(v) for v in self.kept_scores],
            **({"moments": list(self.moments)} if self.moments is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ScoreThreshold:
        if not isinstance(data, dict):
            raise DataError(f"malformed detector threshold: expected an object, got {data!r:.60}")
        try:
            kept = np.asarray(data["kept_scores"], dtype=np.float64)
            moments = data.get("moments")
            if moments is not None:
                mean, std = (float(v) for v in moments)
                moments = (mean, std)
            made = cls(
                float(data["contamination"]), float(data["threshold"]), kept, int(data["n"]),
                str(data.get("kind", "reconstruction")), moments,
            )  # fmt: skip
        except KeyError as exc:
            raise DataError(f"malformed detector threshold: it lacks the field {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"malformed detector threshold: {exc}") from None
        if kept.ndim != 1 or len(kept) == 0 or made.n < len(kept) or np.any(np.diff(kept) < 0):
            raise DataError("malformed detector threshold: kept_scores must be ascending")
        if moments is not None and not (np.isfinite(moments).all() and moments[1] >= 0):
            raise DataError(f"malformed detector threshold: moments {moments} are not a mean "
                            f"and a standard deviation")  # fmt: skip
        return made

    def _scores(self, scores: Any) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 1:
            raise DataError(f"scores must be one per row (1-D), got shape {s.shape}")
        return s

    def _moments(self) -> tuple[float, float]:
        if self.moments is not None:
            return self.moments
        return float(np.mean(self.kept_scores)), float(np.std(self.kept_scores))


def _erf(z: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(z)


def binomial_cdf(k: int, n: int, p: np.ndarray) -> np.ndarray:
    """``P(Binomial(n, p) <= k)`` for each ``p`` in (0, 1): the regularised incomplete
    beta ``I_{1-p}(n - k, k + 1)`` (scipy's when installed, else a continued fraction)."""
    p = np.asarray(p, dtype=np.float64)
    if k < 0:
        return np.zeros_like(p)
    if k >= n:
        return np.ones_like(p)
    try:
        from scipy.special import betainc
    except ImportError:
        return _betainc(float(n - k), float(k + 1), 1.0 - p)
    return betainc(n - k, k + 1, 1.0 - p)


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b) (a, b > 0, x in [0, 1]), by its
    continued fraction evaluated with the modified Lentz method; the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction where it converges fast."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    out = np.empty_like(x)
    flip = x > (a + 1.0) / (a + b + 2.0)
    for flipped, mask, aa, bb, xx in ((False, ~flip, a, b, x), (True, flip, b, a, 1.0 - x)):
        if not mask.any():
            continue
        v = xx[mask]
        inner = (v > 0) & (v < 1)
        res = np.where(v >= 1, 1.0, 0.0)
        w = v[inner]
        log_front = (
            math.lgamma(aa + bb) - math.lgamma(aa) - math.lgamma(bb)
            + aa * np.log(w) + bb * np.log1p(-w)
        )  # fmt: skip
        res[inner] = np.exp(log_front) * _beta_fraction(aa, bb, w) / aa
        out[mask] = 1.0 - res if flipped else res
    return out


def _beta_fraction(a: float, b: float, x: np.ndarray, steps: int = 300) -> np.ndarray:
    tiny = 1e-300
    c = np.ones_like(x)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, steps + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            delta = c * d
            h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-14):
            break
    return h


class DetectorMethods(abc.ABC):
    """PyOD's detector methods for a class with ``_anomaly_scores(X)`` and ``detector``
    (a ``ScoreThreshold``, or None when the model was saved without one)."""

    detector: ScoreThreshold | None

    @abc.abstractmethod
    def _anomaly_scores(self, X: Any) -> np.ndarray:
        """One score per row of ``X``, higher for a more anomalous row."""

    def _threshold(self) -> ScoreThreshold:
        detector = getattr(self, "detector", None)
        if detector is None:
            raise DataError(
                "this model has no detector threshold: fit aecore.AnomalyDetector (PyOD's "
                "conventions, a contamination threshold) and save its model_, or train with "
                "`aecore train ... --contamination`; or call decision_function for the raw "
                "scores"
            )
        return detector

    @checked_keywords
    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score per row: higher is more anomalous."""
        scores = np.asarray(self._anomaly_scores(X), dtype=np.float64)
        # a score overflowing to +inf is above every threshold: an outlier, as the
        # estimator's float64 arithmetic finds it; NaN and -inf would pass as inliers
        bad = np.isnan(scores) | (scores == -np.inf)
        if bad.any():
            raise DataError(
                f"the model's score of rows {row_list(bad)} is not a number or -inf: their "
                f"values overflow the model's float32 arithmetic; rescale or drop them"
            )
        return scores

    @checked_keywords
    def predict(self, X: Any, return_confidence: bool = False):
        """1 for outliers (score above the contamination threshold), 0 for inliers; with
        ``return_confidence``, also ``predict_confidence``'s values (PyOD's keyword)."""
        scores = self.decision_function(X)
        threshold = self._threshold()
        labels = threshold.labels(scores)
        return (labels, threshold.confidence(scores)) if _flag(return_confidence) else labels

    @checked_keywords
    def predict_proba(self, X: Any, method: str = "linear", return_confidence: bool = False):
        """``(n, 2)``: inlier and outlier probabilities (``"linear"`` or ``"unify"``);
        with ``return_confidence``, also ``predict_confidence``'s values."""
        scores = self.decision_function(X)
        threshold = self._threshold()
        proba = threshold.proba(scores, method)
        return (proba, threshold.confidence(scores)) if _flag(return_confidence) else proba

    @checked_keywords
    def predict_confidence(self, X: Any) -> np.ndarray:
        """How sure each ``predict`` label is, in [0, 1]."""
        scores = self.decision_function(X)
        return self._threshold().confidence(scores)


def tied(scores: np.ndarray) -> bool:
    """Whether the scores all agree within rounding (a model that copies its rows scores
    each by its float error): no threshold among them means anything."""
    s = np.asarray(scores, dtype=np.float64)
    return bool(len(s)) and float(np.ptp(s)) <= 1e-9 * max(1.0, float(np.abs(s).max()))


def row_list(bad: np.ndarray) -> str:
    """The rows where ``bad`` (a mask over rows) holds, as "3, 7, ..." (the first five)."""
    rows = np.flatnonzero(bad)
    return ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"return_confidence must be True or False; got {value!r}")
    return bool(value)
