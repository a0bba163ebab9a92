"""Synthetic data with known ground truth for sparse autoencoders, in the spirit of
Sharkey et al. (2022), "Taking features out of superposition with sparse autoencoders":
more feature directions than dimensions, each feature firing rarely and independently,
and every row a non-negative combination of the features that fire on it.

The stream of rows is seeded and addressable: row ``i`` is the same whether it is made
alone, in a batch or in a run of millions, because each block of ``CHUNK_ROWS`` rows
draws from its own generator seeded by ``(seed, block index)``. So a large data set can
be made piece by piece, and the true activations of any rows (a test split, say) can be
made again later from the source string alone (``superposition_from_source``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aecore.errors import DataError

#: rows per independently seeded block of activations; part of the stream's definition
#: (changing it changes every data set)
CHUNK_ROWS = 65536
#: rows per independently seeded block of noise
NOISE_ROWS = 4096
#: floats of (entry, dimension) products built at once when summing features into rows
_SUM_BUDGET = 2**22
# generator streams under one seed, so features, activations and noise never share draws
_FEATURES, _ACTIVATIONS, _NOISE = 0, 1, 2


@dataclass(frozen=True)
class Superposition:
    """``n_features`` unit-norm feature directions in ``d`` dimensions; in each row each
    feature fires independently with probability ``p`` (a scalar, or one per feature)
    with magnitude ``|m|``, ``m ~ Normal(1, magnitude_std)`` (folded, so a feature that
    fires is never exactly zero); ``x = activations @ features + noise * Normal(0, 1)``.

    ``spread_steps`` > 0 pushes the random directions apart before use (see
    ``spread_directions``): fewer large overlaps, orthogonal when ``n_features <= d``.
    """

    d: int = 128
    n_features: int = 1024
    p: float | Sequence[float] = 0.01
    magnitude_std: float = 0.5
    noise: float = 0.0
    seed: int = 0
    spread_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("d", "n_features"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "spread_steps"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("magnitude_std", "noise"):
            value = getattr(self, name)
            if not _is_real(value) or not value >= 0 or not np.isfinite(value):
                raise DataError(
                    f"Superposition: {name} must be a finite number >= 0; got {value!r}"
                )
        if _is_real(self.p):
            probabilities = [self.p]
        else:
            try:
                probabilities = [float(v) for v in self.p]
            except (TypeError, ValueError):
                raise DataError(
                    f"Superposition: p must be a probability or one per feature; got {self.p!r}"
                ) from None
            if len(probabilities) != self.n_features:
                raise DataError(
                    f"Superposition: expected one probability per feature ({self.n_features}); "
                    f"got {len(probabilities)}"
                )
            # a tuple keeps the frozen dataclass hashable and its equality by value
            object.__setattr__(self, "p", tuple(probabilities))
        bad = [v for v in probabilities if not 0 <= v <= 1]
        if bad:
            raise DataError(f"Superposition: p must lie in [0, 1]; got {bad[0]!r}")

    def probabilities(self) -> np.ndarray:
        """Each feature's firing probability, (n_features,) float64."""
        return np.broadcast_to(np.asarray(self.p, dtype=np.float64), (self.n_features,)).copy()

    def features(self) -> np.ndarray:
        """The true feature directions, (n_features, d) float32 unit-norm rows."""
        return _features(self.d, self.n_features, self.seed, self.spread_steps).copy()

    def sample(self, rows: int, *, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, start + rows)`` of the stream: ``x`` (rows, d) and the true
        ``activations`` (rows, n_features), both float32."""
        return self.sample_at(_row_range(rows, start))

    def sample_at(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """The rows at stream positions ``indices`` (any order, repeats allowed): ``x``
        (len, d) and ``activations`` (len, n_features), both float32."""
        indices = _check_indices(indices)
        activations = np.zeros((len(indices), self.n_features), dtype=np.float32)
        return self._rows(indices, activations), activations

    def inputs(self, rows: int, *, start: int = 0) -> np.ndarray:
        """``x`` of ``sample`` without the dense activations (rows, d) float32; the
        memory it needs is that of ``x``."""
        return self._rows(_row_range(rows, start), None)

    def _rows(self, indices: np.ndarray, activations: np.ndarray | None) -> np.ndarray:
        """``x`` at ``indices``; fills ``activations`` (dense, zeroed) when given."""
        features = _features(self.d, self.n_features, self.seed, self.spread_steps)
        x = np.zeros((len(indices), self.d), dtype=np.float32)
        chunk_of = indices // CHUNK_ROWS
        for chunk in np.unique(chunk_of):
            where = np.flatnonzero(chunk_of == chunk)
            starts, feature, magnitude = _chunk(self, int(chunk))
            local = indices[where] - chunk * CHUNK_ROWS
            counts = starts[local + 1] - starts[local]
            # the entries of each asked-for row, rows in the order asked
            before = np.cumsum(counts) - counts
            entry = np.repeat(starts[local] - before, counts) + np.arange(counts.sum())
            out_row = np.repeat(where, counts)
            if activations is not None:
                activations[out_row, feature[entry]] = magnitude[entry]
            _sum_features(x, out_row, features, feature[entry], magnitude[entry])
        if self.noise > 0:
            block_of = indices // NOISE_ROWS
            for block in np.unique(block_of):
                where = np.flatnonzero(block_of == block)
                rng = np.random.default_rng([self.seed, _NOISE, int(block)])
                noise = rng.standard_normal((NOISE_ROWS, self.d), dtype=np.float32)
                x[where] += np.float32(self.noise) * noise[indices[where] - block * NOISE_ROWS]
        return x


def spread_directions(directions: np.ndarray, steps: int) -> np.ndarray:
    """Unit rows pushed apart by ``steps`` of gradient descent on the sum of the 4th
    powers of their pairwise cosines (renormalised after each step). The 4th power
    weighs the largest overlaps most, so the worst pairs separate first; at
    ``n <= d`` the rows become orthogonal. The step is scaled by the current largest
    overlap so it neither stalls as overlaps shrink nor overshoots at the start."""
    out = np.array(directions, dtype=np.float64)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    n, d = out.shape
    rate = 0.25 * min(1.0, d / n)
    for _ in range(steps):
        gram = out @ out.T
        np.fill_diagonal(gram, 0.0)
        largest = np.abs(gram).max()
        if largest == 0:
            break
        out -= rate * (gram * (gram / largest) ** 2) @ out
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


@functools.lru_cache(maxsize=4)
def _features(d: int, n_features: int, seed: int, spread_steps: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _FEATURES])
    directions = spread_directions(rng.standard_normal((n_features, d)), spread_steps)
    out = directions.astype(np.float32)
    out.flags.writeable = False  # shared by every call; callers get copies
    return out


@functools.lru_cache(maxsize=2)
def _chunk(spec: Superposition, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse activations of rows ``[chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)``:
    ``starts`` (CHUNK_ROWS + 1,) such that row r's entries are ``starts[r]:starts[r+1]``
    of ``feature`` and ``magnitude``, in increasing feature order (8 bytes per firing,
    ``CHUNK_ROWS * sum(p)`` firings). Cached because consecutive batches of a stream
    mostly fall in the same chunk."""
    rng = np.random.default_rng([spec.seed, _ACTIVATIONS, chunk])
    # per feature: how many rows it fires on, then which (a uniform subset of that
    # size): together, independent Bernoulli(p) firings, drawn in O(firings)
    counts = rng.binomial(CHUNK_ROWS, spec.probabilities())
    rows = np.concatenate(
        [rng.choice(CHUNK_ROWS, size=int(k), replace=False) for k in counts]
        + [np.empty(0, dtype=np.int64)]
    )
    feature = np.repeat(np.arange(spec.n_features, dtype=np.int32), counts)
    magnitude = np.abs(rng.normal(1.0, spec.magnitude_std, size=len(rows))).astype(np.float32)
    # stable: each row's entries keep their increasing feature order
    order = np.argsort(rows, kind="stable")
    starts = np.zeros(CHUNK_ROWS + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=CHUNK_ROWS), out=starts[1:])
    return starts, feature[order], magnitude[order]


def _sum_features(
    x: np.ndarray,
    out_row: np.ndarray,
    features: np.ndarray,
    feature: np.ndarray,
    magnitude: np.ndarray,
) -> None:
    """``x[r] += magnitude * features[feature]`` over the entries of each row r
    (``out_row`` ascending), added to each row one entry at a time in the given order,
    so a row's value never depends on which other rows were made with it (a matrix
    product's blocking would). Vectorised over rows: pass j adds every row's j-th entry."""
    step = max(1, _SUM_BUDGET // features.shape[1])
    begin = 0
    while begin < len(out_row):
        end = min(begin + step, len(out_row))
        # never split one row's entries between two pieces
        end = int(np.searchsorted(out_row, out_row[end - 1], side="right"))
        rows = out_row[begin:end]
        first = np.searchsorted(rows, rows)  # where each entry's row begins
        rank = np.arange(len(rows)) - first
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(rank.max() + 2))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            pick = by_rank[lo:hi] + begin
            x[out_row[pick]] += features[feature[pick]] * magnitude[pick, None]
        begin = end


def _row_range(rows: int, start: int) -> np.ndarray:
    _check_int("rows", rows, minimum=0)
    _check_int("start", start, minimum=0)
    return np.arange(start, start + rows, dtype=np.int64)


def _check_indices(indices) -> np.ndarray:
    out = np.asarray(indices)
    if out.ndim != 1 or (out.size and out.dtype.kind not in "iu"):
        raise DataError(
            f"Superposition: expected a 1-d array of integer row indices; got shape "
            f"{out.shape}, dtype {out.dtype}"
        )
    out = out.astype(np.int64)
    if out.size and out.min() < 0:
        raise DataError(f"Superposition: row indices must be >= 0; got {out.min()}")
    return out


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(name: str, value, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise DataError(f"Superposition: {name} must be an integer >= {minimum}; got {value!r}")


# -- the data-source form: superposition[:ROWS][,KEY=VALUE...] --------------------------

SOURCE_FORM = "superposition[:ROWS][,KEY=VALUE...]"
DEFAULT_ROWS = 100000
#: source key -> (Superposition field, its type)
SOURCE_KEYS: dict[str, tuple[str, type]] = {
    "d": ("d", int),
    "n": ("n_features", int),
    "p": ("p", float),
    "std": ("magnitude_std", float),
    "noise": ("noise", float),
    "seed": ("seed", int),
    "spread": ("spread_steps", int),
}


def parse_superposition(rest: str) -> tuple[int, Superposition]:
    """The row count and generator of ``superposition:REST``, where REST is
    ``[ROWS][,KEY=VALUE...]`` with keys d, n, p, std, noise, seed, spread (e.g.
    ``100000,d=64,n=512,p=0.02,std=0.5,seed=3``)."""
    source = f"superposition:{rest}" if rest else "superposition"
    parts = rest.split(",") if rest else []
    rows = DEFAULT_ROWS
    if parts and "=" not in parts[0]:
        text = parts.pop(0).strip()
        if text:
            try:
                rows = int(text)
            except ValueError:
                raise DataError(
                    f"{source}: expected {SOURCE_FORM} with ROWS a positive integer; "
                    f"got ROWS {text!r}"
                ) from None
            if rows < 1:
                raise DataError(f"{source}: ROWS must be a positive integer; got {rows}")
    fields = {}
    expected = ", ".join(SOURCE_KEYS)
    for part in parts:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            raise DataError(f"{source}: expected KEY=VALUE (keys {expected}); got {part!r}")
        if key not in SOURCE_KEYS:
            raise DataError(f"{source}: unknown key {key!r}; expected one of {expected}")
        field, kind = SOURCE_KEYS[key]
        if field in fields:
            raise DataError(f"{source}: key {key!r} is given twice")
        try:
            fields[field] = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise DataError(f"{source}: {key} must be {what}; got {value!r}") from None
    try:
        return rows, Superposition(**fields)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None


def superposition_rows(rest: str) -> np.ndarray:
    """The rows ``x`` of the data source ``superposition:REST`` (stream rows 0..ROWS-1)."""
    rows, spec = parse_superposition(rest)
    return spec.inputs(rows)


def superposition_from_source(source: str) -> Superposition | None:
    """The generator behind a data-source string such as a prepared data record's
    ``source``; None when the source is not a superposition. Row i of that source's
    data set is row i of the generator's stream."""
    kind, _, rest = source.partition(":")
    if kind != "superposition":
        return None
    return parse_superposition(rest)[1]
