"""A data source made ready for training: loaded, split (seeded) and with a
normalisation fitted on the training rows. ``prepare_like`` rebuilds the same split for
a saved model (``aecore eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aecore.data.dataset import Dataset
from aecore.data.normalization import Normalization
from aecore.data.sources import load_data
from aecore.data.split import SPLIT_METHODS, ArrayView, Split, split_indices
from aecore.errors import DataError
from aecore.keywords import checked_keywords


@dataclass
class Prepared:
    """A data source split into normalised train/val/test views."""

    dataset: Dataset
    split: Split
    normalization: Normalization
    record: dict[str, Any]

    def view(self, part: str, clip: tuple[float, float] | None = None) -> ArrayView:
        """The part's rows, normalised (and clipped to ``clip``, a model's input range)."""
        return ArrayView(self.dataset.x, getattr(self.split, part), self.normalization, clip=clip)

    def labels(self, part: str) -> np.ndarray | None:
        if self.dataset.labels is None:
            return None
        return self.dataset.labels[getattr(self.split, part)]


@checked_keywords
def prepare(
    source: str,
    *,
    normalize: str | None = None,
    per_feature: bool | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    split: str = "random",
) -> Prepared:
    """Load ``source``, split it (seeded; ``split="stratified"`` keeps each label's share
    in every part), fit the normalisation on the train rows. ``normalize`` None:
    ``"none"`` for an activation cache (``activations:...``: activations keep their
    geometry, so a sparse autoencoder trained on them takes raw activations, as
    ``aecore train`` makes it), ``"minmax"`` for other data."""
    if normalize is None:
        normalize = "none" if source.startswith("activations:") else "minmax"
    if split not in SPLIT_METHODS:
        raise DataError(f"split must be one of {', '.join(SPLIT_METHODS)}; got {split!r}")
    dataset = load_data(source)
    if split == "stratified" and dataset.labels is None:
        raise DataError(f"split='stratified' needs labels; {source} has none")
    parts = split_indices(
        len(dataset),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        labels=dataset.labels if split == "stratified" else None,
    )
    norm = Normalization.fit(normalize, ArrayView(dataset.x, parts.train, raw=True), per_feature)
    record = {
        "source": source,
        "rows": len(dataset),
        "fingerprint": fingerprint(dataset.x),
        "shape": list(dataset.shape),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "normalize": normalize,
        "per_feature": per_feature,
        "split_method": split,
        "split": parts.to_dict(),
    }
    hook = getattr(dataset.x, "hook", None)  # an activation cache's: an SAE export names it
    if hook is not None:
        record["hook"] = hook
    return Prepared(dataset, parts, norm, record)


def prepare_like(model_record: dict[str, Any], source: str | None = None) -> Prepared:
    """The same split and normalisation a saved model was trained with (on ``source``
    if given, else on the source it was trained on)."""
    data = model_record.get("data") or {}
    if source is None and "source" not in data:
        raise DataError("the model folder does not say what data it was trained on; pass --data")
    recorded = source is None
    try:
        prepared = prepare(
            source or data["source"],
            normalize=data.get("normalize", "none"),
            per_feature=data.get("per_feature"),
            val_fraction=data.get("val_fraction", 0.1),
            test_fraction=data.get("test_fraction", 0.2),
            seed=data.get("seed", 0),
            split=data.get("split_method", "random"),
        )
    except DataError as exc:
        if not recorded:
            raise
        raise DataError(
            f"{exc} (the data source recorded at training, {data['source']!r}: a relative "
            f"path is from the directory training ran in; pass --data to name it)"
        ) from None
    rows, recorded_print = data.get("rows"), data.get("fingerprint")
    shape, now = data.get("shape"), list(prepared.dataset.shape)
    if recorded and isinstance(shape, list) and shape != now:
        raise DataError(
            f"{data['source']} now gives rows of shape {tuple(now)}; the model was trained on "
            f"{tuple(shape)} (for a CSV saved by pandas with its index: older versions read "
            f"the index as a feature, this one drops it). Pass --data to name other data"
        )
    if recorded and isinstance(rows, int) and rows != len(prepared.dataset):
        # the split is drawn by row count: other rows would put training rows in the test
        raise DataError(
            f"{data['source']} now holds {len(prepared.dataset)} rows; the model was trained "
            f"on its {rows}, and a split of the changed data would mix training rows into "
            f"the test rows. Restore the data, or pass --data to evaluate on other data"
        )
    if (  # (folders saved before fingerprints were recorded have none)
        recorded
        and isinstance(recorded_print, float)
        and not np.isclose(prepared.record["fingerprint"], recorded_print, rtol=1e-9, atol=0)
    ):
        raise DataError(
            f"{data['source']} holds other values than the model was trained on (a relative "
            f"path is from the directory training ran in): its test rows would not be the "
            f"ones held out. Run from there, or pass --data to evaluate on other data"
        )
    # inference always uses the normalisation stored with the model
    prepared.normalization = Normalization.from_dict(model_record.get("normalization"))
    return prepared


def fingerprint(x: Any) -> float:
    """A number that other rows, or the same ones reordered, change: up to 64 evenly
    spaced rows, each value weighted by a fixed pseudo-random weight (cheap on a memory
    map or an activation cache: 64 rows are read)."""
    n = len(x)
    picks = np.unique(np.linspace(0, n - 1, min(n, 64)).round().astype(np.int64))
    rows = np.asarray(x[picks], dtype=np.float64).reshape(len(picks), -1)
    weights = np.random.default_rng(0).random(rows.shape) + 0.5
    return float((np.nan_to_num(rows) * weights).sum())


def normalised_scale(prepared: Prepared, part: str, rows: int = 1000) -> float | None:
    """The root mean square of up to ``rows`` of a part, normalised: how large the
    model's inputs are (what data in other units than at training changes)."""
    view = prepared.view(part)
    if not len(view):
        return None
    sample = np.asarray(view[np.arange(min(len(view), rows))], dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(sample))))
