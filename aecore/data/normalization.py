"""Data normalisation fitted on training data and stored with the model.

numpy only: the torch-free runtime applies the same normalisation to ONNX inputs.
Parameters are per feature (flattened input) and kept as float64 lists in JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ("minmax", "standardize", "none")
_CHUNK_BYTES = 32 * 2**20  # float64 working set per pass when fitting on memory maps


class Normalization:
    """``minmax`` scales to [0, 1]; ``standardize`` to zero mean and unit variance;
    ``none`` leaves data alone. ``shift``/``scale`` hold one value (global statistics,
    the default for min-max so images stay images) or one per feature. Features with
    scale 0 (constant on train) are only shifted."""

    def __init__(self, kind: str = "none", shift=None, scale=None) -> None:
        if kind not in KINDS:
            raise ValueError(f"normalization must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind = kind
        self.shift = None if shift is None else np.asarray(shift, dtype=np.float64).ravel()
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64).ravel()
        if kind != "none" and (
            self.shift is None or self.scale is None or self.shift.shape != self.scale.shape
        ):
            raise ValueError(f"normalization {kind!r} needs shift and scale of equal size")
        if kind != "none":  # computed once: apply/invert sit on inference hot paths
            safe = np.where(self.scale > 0, self.scale, 1.0)
            self._inverse_scale = np.where(self.scale > 0, 1.0 / safe, 1.0)

    @classmethod
    def fit(cls, kind: str, data: np.ndarray, per_feature: bool | None = None) -> Normalization:
        """Fit on ``data`` of shape (N, ...), streaming over rows (memory maps stay on
        disk). ``per_feature`` defaults to False for minmax, True for standardize."""
        if kind not in KINDS:
            raise ValueError(f"normalization must be one of {', '.join(KINDS)}; got {kind!r}")
        if kind == "none":
            return cls("none")
        n = len(data)
        if n == 0:
            raise ValueError("cannot fit a normalization on an empty array")
        if per_feature is None:
            per_feature = kind == "standardize"
        d = int(np.prod(data.shape[1:]))
        lo = np.full(d, np.inf)
        hi = np.full(d, -np.inf)
        # sums of deviations from a pivot near the mean (the first rows'), so data far
        # from zero (1e9 + noise) keeps its variance instead of cancelling it away
        pivot = None
        total = np.zeros(d)
        total_sq = np.zeros(d)
        rows = max(1, _CHUNK_BYTES // (8 * d))
        for start in range(0, n, rows):
            block = np.asarray(data[start : start + rows], dtype=np.float64).reshape(-1, d)
            if pivot is None:
                pivot = block.mean(0) if per_feature else np.full(d, block.mean())
            lo = np.minimum(lo, block.min(0))
            hi = np.maximum(hi, block.max(0))
            dev = block - pivot
            total += dev.sum(0)
            with np.errstate(over="ignore"):  # beyond float64: refused below
                total_sq += np.square(dev).sum(0)
        count = n
        if not per_feature:
            lo, hi = lo.min(keepdims=True), hi.max(keepdims=True)
            pivot = pivot[:1]
            total, total_sq = total.sum(keepdims=True), total_sq.sum(keepdims=True)
            count = n * d
        if kind == "minmax":
            shift, scale = lo, hi - lo
        else:
            offset = total / count
            shift = pivot + offset
            with np.errstate(over="ignore", invalid="ignore"):  # refused below
                scale = np.sqrt(np.maximum(total_sq / count - offset**2, 0.0))
        # constant: a spread that is rounding next to the values' size (a feature in
        # small units, farads at 1e-13, still varies and is rescaled), or one whose
        # reciprocal overflows float32 (subnormal values: dividing by it gave inf, NaN)
        size = np.maximum(np.abs(lo), np.abs(hi))
        smallest = 1.0 / float(np.finfo(np.float32).max)
        with np.errstate(invalid="ignore"):  # (infinite data: refused below)
            scale = np.where((scale > 1e-12 * size) & (scale > smallest), scale, 0.0)
        big = float(np.finfo(np.float32).max)
        if (
            not (np.isfinite(shift).all() and np.isfinite(scale).all())
            or max(float(np.abs(shift).max()), float(scale.max())) > big
        ):
            from aecore.errors import DataError

            raise DataError(
                f"the data's values reach {max(abs(float(lo.min())), abs(float(hi.max()))):.3g}: "
                f"the normalisation's shift or scale is beyond float32 (up to {big:.3g}), "
                f"the precision models and their outputs in data units are computed in; "
                f"rescale the data"
            )
        return cls(kind, shift, scale)

    def _params(self, shape) -> tuple[np.ndarray, np.ndarray]:
        d = int(np.prod(shape[1:]))
        inv = self._inverse_scale
        if self.shift.size == 1:
            return self.shift.reshape(()), inv.reshape(())
        if self.shift.size != d:
            raise ValueError(
                f"normalization was fitted on {self.shift.size} features; data has {d} "
                f"(shape {tuple(shape)})"
            )
        return self.shift.reshape(shape[1:]), inv.reshape(shape[1:])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise a batch (N, ...) -> float32."""
        x = np.asarray(x)
        if self.kind == "none":
            return x.astype(np.float32, copy=False)
        shift, inv = self._params(x.shape)
        return ((x - shift) * inv).astype(np.float32)

    def invert(self, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Map normalised values back to data units, as ``dtype`` (float64 keeps a large
        shift's precision: a feature near 1.7e9 is a multiple of 128 in float32)."""
        x = np.asarray(x)
        if self.kind == "none":
            return x.astype(dtype, copy=False)
        shift, inv = self._params(x.shape)
        return (x / inv + shift).astype(dtype)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "none":
            return {"kind": "none"}
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    def check_features(self, features: int) -> None:
        """A ValueError unless the parameters fit rows of ``features`` values (one value
        per feature, or one for all) and are finite, with no negative scale."""
        if self.kind == "none":
            return
        if self.shift.size not in (1, features):
            raise ValueError(
                f"the normalisation has {self.shift.size} features; the model has {features}"
            )
        if not (np.isfinite(self.shift).all() and np.isfinite(self.scale).all()):
            raise ValueError("the normalisation holds NaN or infinite values")
        if (self.scale < 0).any():
            raise ValueError("the normalisation holds a negative scale")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Normalization:
        if not d:
            return cls("none")
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"malformed normalization record: {d!r}")
        return cls(d["kind"], d.get("shift"), d.get("scale"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normalization) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Normalization({self.kind!r})"
