"""What ``normalize="auto"`` needs to know about a training set's features beyond the
model's input range: whether they already lie in [0, 1] (pixels, probabilities), are
intensities on one scale from zero (pixel counts: Bernoulli units model them once
scaled as a whole), share one scale otherwise (lengths in one unit, standardised data)
or are quantities in units of their own (a table of measurements), where only rescaling
each feature on its own makes a result independent of the unit each is recorded in.
numpy only; streams over memory maps."""

from __future__ import annotations

from typing import Any

import numpy as np

from aecore.data.normalization import Normalization
from aecore.errors import DataError

UNIT, INTENSITY, SHARED, OWN = "unit", "intensity", "shared", "own"
#: how far above the features' median range (the lower median) the largest may lie for
#: them to count as one scale: digits' pixel counts reach 1.2x per class, iris's lengths
#: 2.3x; tables of quantities in units of their own reach 200x (wine) to 9000x (breast
#: cancer). A feature in a larger unit would dominate one common scale, so one such
#: feature among many makes the whole table "own", and the bound errs that way (each
#: feature rescaled costs little where one scale was right); features of smaller range
#: (a pixel that rarely lights) merely weigh less, as they should on one scale
SHARED_SCALE_SPREAD = 4.0
#: how far below that median the smallest may lie: a feature varying 1e4x less than the
#: others is in a unit of its own (a capacitance in farads beside volts), which one scale
#: would reduce to nothing, where a pixel that rarely lights still varies by a count
#: (1/16 of the typical range on digits)
SHARED_SCALE_GAP = 1e4


def data_units(train) -> str:
    """``UNIT`` (every value in [0, 1]), ``INTENSITY`` (non-negative on one scale, most
    features reaching zero), ``SHARED`` (on one scale otherwise) or ``OWN`` (in units of
    their own) for the rows ``train`` (an array or a view)."""
    if len(train) == 0:
        return UNIT
    extent = Normalization.fit("minmax", train, per_feature=True)  # per-feature lo, hi - lo
    low, ranges = extent.shift, extent.scale
    if float(low.min()) >= 0.0 and float((low + ranges).max()) <= 1.0:
        return UNIT
    varying = ranges[ranges > 0]
    typical = float(np.percentile(varying, 50, method="lower")) if len(varying) else 0.0
    intensity = bool(low.min() >= 0.0 and np.mean(low == 0.0) >= 0.5)
    if len(varying) >= 2:
        spread = float(varying.max()) > SHARED_SCALE_SPREAD * typical
        # (intensities keep a faint pixel faint: a residue after resizing is no unit)
        gap = not intensity and float(varying.min()) * SHARED_SCALE_GAP < typical
        # one scale from the table's lowest value to its highest (min-max as a whole)
        # must not be set by a feature's offset: a year column (2015-2024) beside pixel
        # counts varies as little as they do, but would squash them into [0, 0.008]
        offset = float((low + ranges).max() - low.min()) > SHARED_SCALE_SPREAD * typical
        if spread or gap or offset:
            return OWN
    # one scale (or one feature: nothing to weigh against another)
    return INTENSITY if intensity else SHARED


def hparams_for_units(model_cls: type, units: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` plus the model's hyperparameters for data of ``units`` (each hook's
    values yield to ``given``): on real-valued data (neither in [0, 1] nor
    intensities) its Gaussian-unit ones (``real_valued_hparams``): min-max scaling it
    for Bernoulli units feeds the model every new row beyond the training range clipped
    to its edge, where it tells an anomaly from the most extreme normal row only by the
    charge for the distance (one-class iris, clipped alone: vae 0.878 -> 0.997; wine
    0.745 -> 0.982); on data in [0, 1] or intensities (min-max
    scaled as a whole), grey values meant as such, its ``rescaled_hparams``."""
    name = "rescaled_hparams" if units in (UNIT, INTENSITY) else "real_valued_hparams"
    hook = getattr(model_cls, name, None)
    return dict(given) if hook is None else {**hook(dict(given)), **given}


def per_feature_normalization(input_range, train) -> Normalization:
    """Each feature rescaled on its own: to [0, 1] for a model with an input range,
    else standardised."""
    return Normalization.fit("minmax" if input_range else "standardize", train, per_feature=True)


def shared_scale_normalization(input_range, train) -> Normalization:
    """The features' relative sizes kept: min-max scaled as a whole for a model with an
    input range, else each centred and all divided by one scale."""
    if input_range is not None:
        return Normalization.fit("minmax", train, per_feature=False)
    norm = Normalization.fit("standardize", train, per_feature=True)
    common = float(np.sqrt(np.mean(norm.scale**2)))
    return Normalization("standardize", norm.shift, np.full_like(norm.scale, common))


def check_in_model_range(input_range, lo: float, hi: float, normalize: str, name: Any) -> None:
    """The training rows, normalised (their range ``[lo, hi]``), must lie in the range
    the model takes: new rows are clipped to it (and charged for the distance), so
    training on values beyond it would fit what the model is never served (and a
    detector would label training rows by scores they do not get)."""
    if input_range is None:
        return
    if float(lo) < input_range[0] or float(hi) > input_range[1]:
        raise DataError(
            f"normalize={normalize!r} leaves the training rows in [{float(lo):.4g}, "
            f"{float(hi):.4g}], but {name!r} with these settings takes inputs in "
            f"[{input_range[0]:g}, {input_range[1]:g}]: normalize with 'minmax' (or 'auto', "
            f"which follows the model), or choose the model's settings for real values"
        )


def error_scale(X: np.ndarray) -> np.ndarray:
    """The units of an estimator's ``score``: the training rows' standard deviation,
    per feature where the features are in units of their own (see ``data_units``)."""
    spread = np.std(X, axis=0) if data_units(X) == OWN else np.full(X.shape[1], np.std(X))
    return np.where(spread > 0, spread, 1.0)


def fit_normalization(input_range, normalize: str, units: str | None, X) -> Normalization:
    """``normalize`` fitted on ``X``; ``"auto"`` by the data's ``units``: data in [0, 1]
    stays as it is, features on one scale keep their relative sizes, features in units
    of their own are each rescaled (see ``AutoencoderTransformer``'s ``normalize``)."""
    if normalize != "auto":
        return Normalization.fit(normalize, X, per_feature=True)
    if units == UNIT:
        return Normalization("none")
    if units in (INTENSITY, SHARED):
        return shared_scale_normalization(input_range, X)
    return per_feature_normalization(input_range, X)
