"""A data set of rows and its checks: every source ends up as a ``Dataset``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aecore.errors import DataError

_SCAN_BYTES = 32 * 2**20  # bytes read per pass when scanning memory-mapped data


@dataclass
class Dataset:
    """Rows ``x`` (N, *shape), maybe a memory map or a lazy row store (see
    ``as_dataset``), optional integer ``labels``."""

    x: np.ndarray
    labels: np.ndarray | None
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)


def as_dataset(x: Any, labels=None, source: str = "array", *, check_finite: bool = True) -> Dataset:
    """Validate an array of rows and wrap it.

    An object that reads its rows on demand and says so with ``lazy_rows = True`` (an
    activation cache: ``shape``, a numpy ``dtype``, ``ndim``, ``len``, indexing by int,
    slice or index array) is kept as it is, like a memory map; with ``all_finite =
    True`` it vouches that its values were checked when written and is not scanned.
    """
    lazy = getattr(x, "lazy_rows", False) is True
    if not isinstance(x, np.ndarray) and not lazy:
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise DataError(
                f"{source}: cannot convert {type(x).__name__} to an array: {exc}"
            ) from None
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: expected numeric data; got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{source}: expected an array of rows (N, features...) with at least 2 axes; "
            f"got shape {x.shape}"
        )
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise DataError(f"{source}: the data is empty (shape {x.shape})")
    if check_finite and x.dtype.kind == "f" and not (lazy and x.all_finite):
        check_all_finite(x, source)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],):
            raise DataError(
                f"{source}: expected one label per row ({x.shape[0]}); got labels of shape "
                f"{labels.shape}"
            )
    return Dataset(x, labels, source)


def check_all_finite(x: np.ndarray, source: str) -> None:
    """Raise a DataError naming the first NaN/inf (row and feature index), or the first
    value beyond float32's range (models compute in float32: it would become inf)."""
    n = len(x)
    chunk = max(1, _SCAN_BYTES // max(1, x[:1].nbytes))
    big = np.finfo(np.float32).max
    for start in range(0, n, chunk):
        block = np.asarray(x[start : start + chunk])
        bad = ~np.isfinite(block)
        if block.dtype.itemsize > 4 and not bad.any() and np.abs(block).max(initial=0) > big:
            where = np.argwhere(np.abs(block) > big)[0]
            raise DataError(
                f"{source}: {block[tuple(where)]:.3g} at row {start + int(where[0])} is beyond "
                f"float32's range (up to {big:.3g}), the precision models compute in; rescale "
                f"the data"
            )
        if bad.any():
            where = np.argwhere(bad)[0]
            row = start + int(where[0])
            index = tuple(int(i) for i in where[1:])
            value = block[tuple(where)]
            count = int(bad.sum())
            raise DataError(
                f"{source}: {value} at row {row}, feature {index if len(index) > 1 else index[0]}"
                f" ({count} non-finite value{'s' if count > 1 else ''} in rows "
                f"{start}-{start + len(block) - 1}); clean or impute the data first"
            )


def rows_in_shape(x: Any, input_shape: tuple[int, ...]) -> Any:
    """Rows laid out for a model taking ``input_shape``: flat rows of as many values as
    images of it (in C order, as ``digits`` holds ``digits:image``'s pixels), and images
    as flat rows for a vector model. Another layout (channels last, say) passes as it is,
    for the model to name."""
    shape, given = tuple(input_shape), tuple(x.shape[1:])
    flat = len(shape) == 1 or len(given) == 1
    if given == shape or not flat or int(np.prod(given)) != int(np.prod(shape)):
        return x
    if len(given) == 3 and given[2] in (1, 3, 4) and given[2] < min(given[:2]):
        return x  # images with their channels last: flattened, their pixels would scramble
    return x.reshape(len(x), *shape)


def layout_hint(got: tuple[int, ...], shape: tuple[int, ...], name: str = "x") -> str:
    """How an array of shape ``got`` (rows first) becomes rows of ``shape``, as the tail
    of an error message ("; channels come first: ..."), or "" where no rule applies."""
    rows, shape = tuple(got[1:]), tuple(shape)
    if tuple(got) == shape:
        return f"; for a single sample pass {name}[None]"
    if len(shape) == 3 and rows == (*shape[1:], shape[0]):
        # channels last: a reshape would scramble the pixels
        return f"; channels come first: {name}.transpose(0, 3, 1, 2)"
    if len(got) == 4 and len(set(shape)) == 3 and sorted(rows) == sorted(shape):
        axes = ", ".join(str(1 + rows.index(d)) for d in shape)
        return f"; its axes are in another order: {name}.transpose(0, {axes})"
    if got and 0 not in got and int(np.prod(rows)) == int(np.prod(shape)):
        wanted = ", ".join(map(str, shape))
        return f"; reshape to (N, {wanted}) with {name}.reshape(-1, {wanted})"
    return ""
