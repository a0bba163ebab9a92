"""What ``normalize="auto"`` needs to know about a training set's features beyond the
model's input range: whether they already lie in [0, 1] (pixels, probabilities), share
one scale (pixel counts, lengths in one unit) or are quantities in units of their own (a
table of measurements), where only rescaling each feature on its own makes a result
independent of the unit each is recorded in. numpy only; streams over memory maps."""

from __future__ import annotations

from typing import Any

import numpy as np

from aecore.data.normalization import Normalization

UNIT, SHARED, OWN = "unit", "shared", "own"
#: the spread (90th over 10th percentile) of the features' ranges up to which they count
#: as one scale: digits' pixel counts spread up to 5x per class, iris's lengths 3x; a
#: table of quantities in their own units spreads 60x (wine) to 4000x (breast cancer)
SHARED_SCALE_SPREAD = 10.0


def data_units(train) -> str:
    """``UNIT``, ``SHARED`` or ``OWN`` for the rows ``train`` (an array or a view)."""
    if len(train) == 0:
        return UNIT
    extent = Normalization.fit("minmax", train, per_feature=True)  # per-feature lo, hi - lo
    low, ranges = extent.shift, extent.scale
    if float(low.min()) >= 0.0 and float((low + ranges).max()) <= 1.0:
        return UNIT
    varying = ranges[ranges > 0]
    if len(varying) < 2:
        return SHARED
    p10, p90 = np.percentile(varying, [10, 90])
    return SHARED if p90 <= SHARED_SCALE_SPREAD * p10 else OWN


def real_valued_hparams(model_cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The model's ``real_valued_hparams`` (Gaussian units in place of Bernoulli ones)
    for data in units of its own, unless the caller set any of them: min-max scaling
    such data for Bernoulli units clips every new row beyond the training range to its
    edge, where an anomaly cannot be told from the most extreme normal row."""
    real = getattr(model_cls, "real_valued_hparams", {})
    return {} if any(name in given for name in real) else dict(real)


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
