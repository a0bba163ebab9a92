"""pandas DataFrames as training and scoring data: numeric columns only, named when not."""

from __future__ import annotations

from typing import Any

import numpy as np

from aecore.errors import DataError


def is_frame(data: Any) -> bool:
    """Whether ``data`` is a DataFrame (duck-typed: pandas need not be installed)."""
    return hasattr(data, "columns") and hasattr(data, "dtypes") and hasattr(data, "to_numpy")


def check_numeric_columns(data: Any, name: str) -> None:
    """A DataError naming a DataFrame's columns that do not hold numbers (strings,
    categories, dates): a model takes numbers only, and pandas' own error names a value,
    not its column."""
    if not is_frame(data) or _numeric(data):  # numbers held as objects convert too
        return
    bad = [
        f"{column!r} ({data[column].dtype})"
        for column in data.columns
        if not _numeric(data[column])
    ]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(
            f"{name}: column{'s' if len(bad) > 1 else ''} {', '.join(bad[:5])}{more} "
            f"{'do' if len(bad) > 1 else 'does'} not hold numbers; the model takes numeric "
            f"columns only: encode them as numbers (one-hot, codes) or drop them"
        )


def frame_values(data: Any, name: str) -> Any:
    """A DataFrame's values as a float array (after ``check_numeric_columns``); anything
    else as it is. Indexing a DataFrame by rows the way arrays are indexed would pick
    columns."""
    if not is_frame(data):
        return data
    try:
        return data.to_numpy(dtype=np.float64, copy=True)  # writable: torch wants that
    except (TypeError, ValueError):
        check_numeric_columns(data, name)  # names the columns
        raise


def _numeric(values: Any) -> bool:
    """Whether a frame's or a column's values convert to float64 (times do, as counts of
    nanoseconds, which no model should read as a quantity)."""
    dtypes = list(values.dtypes) if hasattr(values, "columns") else [values.dtype]
    if any(getattr(dtype, "kind", None) in ("m", "M") for dtype in dtypes):
        return False
    try:
        values.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True
