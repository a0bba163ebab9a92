"""The numpy interface of a model: inputs in data units are checked, normalised with the
stored normalisation, run in batches; outputs go back to data units. Subclasses supply
the forward pass of each part (onnxruntime here; PyTorch in the command line)."""

from __future__ import annotations

import abc
import contextlib
from typing import Any

import numpy as np

from aecore.data.dataset import layout_hint
from aecore.data.normalization import Normalization
from aecore.detection import DetectorMethods, ScoreThreshold, row_list
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.runtime.format import DEFAULT_BATCH_SIZE


class ArrayModel(DetectorMethods, abc.ABC):
    """numpy front end shared by the ONNX runtime and the command line's PyTorch path:
    input checks, normalisation, batching, and PyOD's detector methods
    (``decision_function`` is the detector's kind of ``score``, as the estimator scores
    new rows; ``predict``, ``predict_proba`` and ``predict_confidence`` use the
    ``detector`` threshold saved with the model).
    Subclasses set ``name``, ``input_shape``, ``latent_dim``, ``normalization`` and
    ``detector``, and implement ``_forward``."""

    name: str
    input_shape: tuple[int, ...]
    latent_dim: int
    detector: ScoreThreshold | None = None
    #: whether the model's forward pass takes and gives data units itself (an export
    #: with the normalisation folded into its graphs)
    normalizes_itself: bool = False

    #: the range of normalised inputs the model takes (None: any real values): rows are
    #: clipped to it, and scores charge the distance beyond, as the estimator's
    input_range: tuple[float, float] | None = None
    #: whether the graphs clip rows to the input range (and a score graph charges what
    #: lies beyond) themselves: rows go in as given
    graphs_clip: bool = False
    #: whether scores charge rows beyond the input range (an export from before they
    #: did scores them as their clipped selves throughout, as it always did)
    scores_charged: bool = True
    #: what ``score`` gives by default: the model's ``Autoencoder.default_score_kind``
    #: where it can be computed (an ONNX export with its score graph), else the
    #: reconstruction error
    default_score_kind: str = "reconstruction"
    #: the kinds the model scores by (None: not recorded)
    score_kinds: list[str] | None = None
    #: the columns the model was fitted on (a scikit-learn estimator's DataFrame), or None:
    #: rows given as a DataFrame must have them in that order
    feature_names: list[str] | None = None

    @property
    def threshold_(self) -> float:
        """The saved detector's threshold, as ``AnomalyDetector.threshold_`` (PyOD's
        name); the training rows' scores and labels are not saved with the model."""
        if self.detector is None:  # so hasattr / getattr(..., None) work as on PyOD's
            raise AttributeError("threshold_: this model was saved without a detector")
        return self.detector.threshold

    def _anomaly_scores(self, X: Any) -> np.ndarray:
        x = self._check_inputs(X)
        _check_finite(x)
        kind = self.detector.kind if self.detector is not None else self.default_score_kind
        if kind != "reconstruction":
            return self._kind_scores(x, kind)
        return self._errors(x, DEFAULT_BATCH_SIZE)

    def _computes(self, kind: str) -> bool:
        """Whether ``score`` can give ``kind`` (an export holds only some graphs)."""
        return True

    def _kind_scores(self, X: Any, kind: str, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Scores of a kind other than the reconstruction error (float64), as
        ``Autoencoder.score`` gives them."""
        raise DataError(
            f"scoring by the model's {kind!r} needs the model itself: serve the model "
            f"folder (torch), or pass kind='reconstruction'"
        )

    @abc.abstractmethod
    def _forward(self, part: str, batch: np.ndarray) -> np.ndarray:
        """Run one part on a float32 batch (normalised units)."""

    @property
    def normalization(self) -> Normalization:
        """The data normalisation stored with the model (a ``Normalization``)."""
        return self._normalization

    @normalization.setter
    def normalization(self, norm: Normalization) -> None:
        if not isinstance(norm, Normalization):
            raise ConfigError(f"normalization must be a Normalization; got {norm!r}")
        if getattr(self, "_normalization_fixed", False):
            raise ConfigError(
                "this export computes its normalisation inside its graphs, so it cannot be "
                "replaced here: set the model's normalization and export it again"
            )
        self._normalization = norm
        # float32 copies of its parameters for the hot path (float32 inputs, outputs);
        # other dtypes go through Normalization.apply, which computes in float64
        self._shift = self._scale = self._inv = None
        self._shifted = False  # a zero shift (min-max of non-negative data) saves a pass
        if norm.kind != "none":
            shift, scale = norm.shift, norm.scale
            try:
                norm.check_features(int(np.prod(self.input_shape)))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            shape = () if shift.size == 1 else self.input_shape
            safe = np.where(scale > 0, scale, 1.0)  # constant features are only shifted
            self._shift = shift.reshape(shape).astype(np.float32)
            self._scale = safe.reshape(shape).astype(np.float32)
            self._inv = (1.0 / safe).reshape(shape).astype(np.float32)
            self._shifted = bool(np.any(self._shift))

    def _apply(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32:
            return self._normalization.apply(x)
        if self._shift is None:
            return x
        if not self._shifted:
            return np.multiply(x, self._inv)
        y = np.subtract(x, self._shift)
        y *= self._inv
        return y

    def _invert(self, y: np.ndarray) -> np.ndarray:
        """Normalised model outputs (a fresh float32 array, changed in place) -> data units."""
        if self._shift is not None:
            y *= self._scale
            if self._shifted:
                y += self._shift
        return y

    # -- public API -------------------------------------------------------------------
    def encode(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Codes ``(N, latent_dim)`` float32 of inputs ``(N, *input_shape)`` in data units,
        clipped to the model's ``input_range`` once normalised (as the estimator's
        ``transform``). A row with NaN (or values beyond float32's range, which the
        model computes in) encodes to NaN, as in the model; ``score`` and the detector
        methods refuse such rows."""
        x = self._check_inputs(x)
        return self._map("encoder", x, (self.latent_dim,), batch_size, inputs=True)

    def decode(self, z: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Inputs ``(N, *input_shape)`` in data units decoded from codes ``(N, latent_dim)``."""
        z = self._check_codes(z)
        y = self._map("decoder", z, self.input_shape, batch_size, inputs=False)
        return y if self.normalizes_itself else self._invert(y)

    def reconstruct(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """``decode(encode(x))`` in data units: normalise (and clip, as ``encode``), run
        the model, invert."""
        x = self._check_inputs(x)
        y = self._map("full", x, self.input_shape, batch_size, inputs=True)
        return y if self.normalizes_itself else self._invert(y)

    def score_kind(self, kind: str | None = None) -> str:
        """The kind ``score(x, kind=kind)`` gives: ``kind`` itself, or for None the
        detector's kind where this model computes it, else ``default_score_kind``."""
        if kind is not None:
            return kind
        thresholded = self.detector.kind if self.detector is not None else None
        computes = thresholded is not None and self._computes(thresholded)
        return thresholded if computes else self.default_score_kind

    def score(
        self, x: Any, *, kind: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """Anomaly score per row, ``(N,)``, higher for a more anomalous row: the model's
        ``Autoencoder.score(x, kind)`` on normalised inputs. ``kind`` None is the kind
        the model's detector thresholds where it has one and this model computes it
        (what ``decision_function`` gives, on a folder and its exports of all parts
        alike), else ``default_score_kind``: the model's own default for a model folder
        and for an export of all parts that carries its graph, the reconstruction error
        otherwise. ``"reconstruction"``, the mean squared reconstruction error in
        normalised units (float32), is served by every export. Other kinds (float64) come
        from the export's score graph. A model with an ``input_range`` scores rows
        clipped to it and charges the distance beyond, as ``Autoencoder.score`` (an
        export made before that charge scores the clipped rows alone, as it did)."""
        kind = self.score_kind(kind)
        batch_size = _check_batch_size(batch_size)
        if not isinstance(kind, str):
            raise ConfigError(f"kind must be a score kind's name; got {kind!r}")
        if self.score_kinds is not None and kind not in self.score_kinds:
            raise ConfigError(
                f"{self.name} scores by {', '.join(map(repr, self.score_kinds))}; got kind={kind!r}"
            )
        x = self._check_inputs(x)
        _check_finite(x)  # a NaN score is above no threshold: refused, not returned
        if kind != "reconstruction":
            return self._kind_scores(x, kind, batch_size)
        return self._errors(x, batch_size)

    def _errors(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        n = len(x)
        if 0 < n <= batch_size:
            return self._row_errors(x)
        out = np.empty((n,), dtype=np.float32)
        for start in range(0, n, batch_size):
            out[start : start + batch_size] = self._row_errors(x[start : start + batch_size])
        return out

    def _row_errors(self, x: np.ndarray) -> np.ndarray:
        # the error against the row as given: one beyond the input range is charged
        # for its distance from it, as Autoencoder.score charges it
        given = self._unclipped(x)
        err = self._forward("full", self._clipped(given))
        err -= given if self.scores_charged else self._clipped(given, always=True)
        if self.normalizes_itself and self._inv is not None:
            err *= self._inv  # (x_hat - x) / scale: the shift cancels
        err = err.reshape(len(err), -1)
        # row sums of squares in one pass (np.mean over axes is several times slower)
        return np.einsum("ij,ij->i", err, err) / err.shape[1]

    # -- helpers ------------------------------------------------------------------------
    def _inputs(self, x: np.ndarray) -> np.ndarray:
        """Rows in data units -> what the forward pass takes (float32): normalised unless
        the graphs normalise themselves, clipped to the model's input range."""
        return self._clipped(self._unclipped(x))

    def _unclipped(self, x: np.ndarray) -> np.ndarray:
        return _float32(x) if self.normalizes_itself else self._apply(x)

    def _clipped(self, x: np.ndarray, always: bool = False) -> np.ndarray:
        """``_unclipped``'s rows clipped to the input range, unless the graphs clip."""
        if self.input_range is None or (self.graphs_clip and not always):
            return x
        lo, hi = self.input_range
        if self.normalizes_itself and self._shift is not None:  # in data units
            lo, hi = self._shift + lo * self._scale, self._shift + hi * self._scale
        return np.clip(x, lo, hi)

    def _map(self, part, x, out_shape, batch_size, *, inputs: bool) -> np.ndarray:
        """``part`` over batches of ``x``: rows in data units (``inputs``) or codes."""
        batch_size = _check_batch_size(batch_size)
        prepare = self._inputs if inputs else _float32
        n = len(x)
        if n <= batch_size:  # the common case: one call, no copy into an output buffer
            if not n:
                return np.empty((0, *out_shape), np.float32)
            return self._forward(part, prepare(x))
        out = np.empty((n, *out_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = x[start : start + batch_size]
            out[start : start + len(chunk)] = self._forward(part, prepare(chunk))
        return out

    def _check_inputs(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray and x.dtype == np.float32 and x.shape[1:] == self.input_shape:
            if x.ndim == len(self.input_shape) + 1:  # the hot path: nothing to convert
                return x
        columns = getattr(x, "columns", None)
        if columns is not None and self.feature_names is not None:
            check_columns([str(c) for c in columns], self.feature_names)
        return _check_array(x, self.input_shape, f"{self.name} expects inputs", "x")

    def _check_codes(self, z: Any) -> np.ndarray:
        z = _check_array(z, (self.latent_dim,), f"{self.name}.decode expects codes", "z")
        return z.astype(np.float32, copy=False)


def _check_array(x: Any, shape: tuple[int, ...], what: str, name: str) -> np.ndarray:
    expected = f"(N, {', '.join(map(str, shape))})"
    if hasattr(x, "toarray") and hasattr(x, "nnz"):  # scipy.sparse: no dense view
        raise DataError(f"{what} as a dense array of shape {expected}; got a sparse "
                        f"{type(x).__name__}: pass {name}.toarray()")  # fmt: skip
    if not isinstance(x, np.ndarray):
        given = x
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise DataError(
                f"{what} as an array of shape {expected}; cannot convert {type(x).__name__}: {exc}"
            ) from None
        if x.dtype == object and hasattr(given, "to_numpy"):
            # pandas' nullable columns (Float64, Int64 with <NA>) come out as objects;
            # text in a column stays so, and is refused below
            with contextlib.suppress(TypeError, ValueError):
                x = given.to_numpy(dtype=np.float64, na_value=np.nan)
    if x.dtype.kind not in "fiub":  # (booleans count as 0 and 1, as the estimator's)
        raise DataError(
            f"{what} as a float or integer array of shape {expected}; got dtype {x.dtype}"
        )
    if x.shape[1:] != shape or x.ndim != len(shape) + 1:
        hint = layout_hint(x.shape, shape, name)
        raise ShapeError(f"{what} of shape {expected}; got shape {tuple(x.shape)}{hint}")
    return x


def check_columns(got: list[str], want: list[str]) -> None:
    """A DataFrame's (or a CSV header's) columns against the ones the model was fitted
    on."""
    if got == want:
        return
    if sorted(got) == sorted(want):
        raise DataError(
            f"X's columns are in another order than at fit ({', '.join(want[:5])}"
            f"{', ...' if len(want) > 5 else ''}): select them as X[model.feature_names]"
        )
    missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
    raise DataError(
        f"X's columns differ from the ones the model was fitted on: missing "
        f"{missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}"
    )


def _check_finite(x: np.ndarray) -> None:
    """A row with NaN would score NaN, which no threshold calls an outlier; so would one
    beyond float32's range, which the model computes in."""
    rows = x.reshape(len(x), int(np.prod(x.shape[1:])))  # (an empty batch too)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(
            f"X contains NaN or infinite values (rows {row_list(~np.isfinite(rows).all(1))}): "
            f"a detector cannot score them; drop or impute them first"
        )
    big = np.finfo(np.float32).max
    if x.dtype.itemsize > 4 and x.size and np.abs(x).max() > big:
        raise DataError(
            f"X has values beyond float32's range (rows {row_list((np.abs(rows) > big).any(1))}"
            f"), which the model computes in: rescale or drop them"
        )


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int; got {batch_size!r}")
    return batch_size


def _float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    with np.errstate(over="ignore"):  # beyond float32's range: inf, and the row NaN
        return x.astype(np.float32)
