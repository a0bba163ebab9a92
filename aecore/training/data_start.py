"""What a run's start reads of the training data: a bounded sample of the rows given to
fit, and the data-dependent initialisation (PCA starts, an SAE's scale) it feeds."""

from __future__ import annotations

import torch

from aecore.errors import DataError
from aecore.training.batches import Batches, first_non_finite
from aecore.training.evaluation import input_dtype

#: rows of training data that data-dependent initialisation sees at most
INIT_ROWS = 10000


def train_sample(model, init_data: Batches) -> list[torch.Tensor]:
    """The first batches of the first epoch's order of the rows given to fit, up to
    INIT_ROWS: a bounded sample (data larger than memory stays on disk), the same in
    every process."""
    xs, seen = [], 0
    # a loader's, Dataset's or memory map's rows are not checked up front: a NaN here
    # would pass into the data-dependent start before any step could see it
    unchecked = not init_data.in_memory
    for x in init_data.epoch(0):
        x = x.to(input_dtype(model))
        bad = first_non_finite(x, "the first epoch's order", first=seen) if unchecked else None
        if bad is not None:
            raise DataError(f"data: {bad}; clean or impute the data first")
        xs.append(x)
        seen += len(x)
        if seen >= INIT_ROWS:
            break
    return xs


def data_init(model, init_data: Batches, device: torch.device) -> None:
    """The model's ``init_from_data`` on the sample, once: a model that was trained or
    loaded continues from its weights, though given weights may still need what its
    recipe measures on the data (an imported SAE's scale)."""
    init = getattr(model, "init_from_data", None)
    if getattr(model, "data_initialised", False):
        needs = getattr(model, "needs_data_statistics", False)
        init = getattr(model, "adopt_data_statistics", None) if needs else None
    if init is None:
        return
    with torch.no_grad():
        init(torch.cat(train_sample(model, init_data)).to(device))
    model.data_initialised = True
