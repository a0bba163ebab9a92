"""The seeded train/val/test split and lazily normalised views of its rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aecore.data.normalization import Normalization
from aecore.errors import DataError


# -- split and normalised views ----------------------------------------------------
@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


#: how rows are assigned to train/val/test: at random, or at random within each label
SPLIT_METHODS = ("random", "stratified")


def split_indices(
    n: int,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> Split:
    """A seeded random split of ``n`` rows; each index array is sorted (memory maps read
    forward). With ``labels`` it is stratified: every label keeps its share of the rows
    in each part."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1); got {f}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be < 1; got {val_fraction} + {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [rng.permutation(n)]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise DataError(f"a stratified split needs one label per row ({n}); got {labels.shape}")
        groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    parts: tuple[list, list, list] = ([], [], [])
    for perm in groups:
        n_test = int(round(len(perm) * test_fraction))
        n_val = int(round(len(perm) * val_fraction))
        parts[0].append(perm[n_test + n_val :])
        parts[1].append(perm[n_test : n_test + n_val])
        parts[2].append(perm[:n_test])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    if len(train) < 1 or (test_fraction > 0 and len(test) < 1):
        raise DataError(
            f"{n} rows are too few to split into train/val/test (a test fraction of "
            f"{test_fraction:g} needs at least one test row)"
        )
    return Split(train, val, test)


class ArrayView:
    """Rows ``x[indices]`` of a (maybe memory-mapped) array, normalised on access.

    Indexing with an int or an index array reads only those rows, so a view of data
    larger than RAM costs nothing until a batch is drawn.
    """

    def __init__(
        self,
        x: np.ndarray,
        indices: np.ndarray | None = None,
        normalization: Normalization | None = None,
        *,
        raw: bool = False,
        clip: tuple[float, float] | None = None,
    ) -> None:
        self.x = x
        self.indices = np.arange(len(x)) if indices is None else np.asarray(indices)
        self.normalization = normalization or Normalization("none")
        self.raw = raw  # rows as stored (dtype kept), e.g. to fit a normalisation
        # normalised rows clipped to a model's input range, as served rows are: rows
        # beyond the training rows' range are held to it
        self.clip = clip

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.x.shape[1:])

    def __getitem__(self, item) -> np.ndarray:
        rows = self.indices[item]
        if np.ndim(rows) == 0:
            row = np.asarray(self.x[int(rows)])
            return row if self.raw else self._normalized(row[None])[0]
        order = np.argsort(rows, kind="stable")  # read memory maps forward
        block = np.asarray(self.x[rows[order]])
        if self.raw:
            out = np.empty_like(block)
            out[order] = block
            return out
        out = np.empty_like(block, dtype=np.float32)
        out[order] = self._normalized(block)
        return out

    def _normalized(self, block: np.ndarray) -> np.ndarray:
        out = self.normalization.apply(block)
        return out if self.clip is None else np.clip(out, *self.clip)

    def to_numpy(self) -> np.ndarray:
        return self[np.arange(len(self))]

    def __getattr__(self, name: str):
        # the data's own shuffle order (an activation cache reads its shards in long
        # runs), restricted to this view's rows; only when the data has one
        if name == "epoch_order" and hasattr(self.x, "epoch_order"):
            return self._epoch_order
        raise AttributeError(name)

    def _epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Positions in this view of the rows the data's order visits, in its sequence."""
        return positions_in(self.indices, self.x.epoch_order(epoch, seed))


def positions_in(rows, order) -> np.ndarray:
    """The positions in ``rows`` (distinct row numbers, any order) of the rows that
    ``order`` (a sequence of the data's rows) visits, in its sequence; rows that
    ``rows`` lacks are skipped."""
    rows, order = np.asarray(rows), np.asarray(order)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    by_row = np.argsort(rows, kind="stable")
    sorted_rows = rows[by_row]
    at = np.searchsorted(sorted_rows, order).clip(max=len(sorted_rows) - 1)
    return by_row[at[sorted_rows[at] == order]]
