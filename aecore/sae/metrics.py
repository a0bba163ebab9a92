"""Metrics of sparse autoencoders (SAEs): reconstruction (fraction of variance
unexplained), sparsity (L0, dead latents), shrinkage, and, where the true features are
known, how well the dictionary and the codes recover them (MMCS, MCC).

Every metric streams: an accumulator takes batches (``update``) and keeps its sums in
float64, so it runs over millions of rows in bounded memory; the one-shot functions
feed their inputs (tensors or arrays, rows first) through the same accumulators.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from aecore.base import eval_mode
from aecore.data.split import ArrayView
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.keywords import checked_keywords

if TYPE_CHECKING:
    from aecore.data.superposition import Superposition

BATCH_SIZE = 4096
#: rows of each side of the cosine-similarity blocks ``mmcs`` builds at once
COSINE_BLOCK = 4096
#: a spread below this fraction of the mean is rounding, not variation (float64 sums)
_STILL = 1e-10


def _tensor(a: Any) -> torch.Tensor:
    """``a`` as a tensor; arrays are shared unless read-only (torch cannot share those)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    return torch.as_tensor(a if a.flags.writeable else a.copy())


def _matrix(a: Any, name: str) -> torch.Tensor:
    """``a`` as a 2-d floating tensor (float32 at least)."""
    a = _tensor(a)
    if a.ndim != 2:
        raise ShapeError(f"{name}: expected 2-d rows (N, features); got {tuple(a.shape)}")
    return a.to(torch.promote_types(a.dtype, torch.float32))


def _pair(a: Any, b: Any, names: str, *, same_width: bool = True):
    """Two matrices of the same rows (and, with ``same_width``, the same columns)."""
    first, second = names.split(", ")
    a, b = _matrix(a, first), _matrix(b, second)
    if len(a) != len(b) or (same_width and a.shape != b.shape):
        what = "shapes" if same_width else "rows"
        raise ShapeError(f"{names}: expected equal {what}; got {tuple(a.shape)}, {tuple(b.shape)}")
    return a, b


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    for begin in range(0, n, batch_size):
        yield slice(begin, min(begin + batch_size, n))


class VarianceUnexplained:
    """Fraction of variance unexplained over a stream of ``(x, x_hat)`` batches:

    ``FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, sums over all rows and
    dimensions, ``mean(x)`` the per-dimension mean over all rows seen (not per batch).
    ``explained_variance = 1 - FVU``. Predicting the mean gives 1, perfect
    reconstruction 0. NaN when the rows seen have no variance.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._mean = torch.zeros((), dtype=torch.float64)
        self._spread = 0.0  # sum of squared deviations from the running mean
        self._residual = 0.0

    def update(self, x: Any, x_hat: Any) -> None:
        x, x_hat = _pair(x, x_hat, "x, x_hat")
        if len(x) == 0:
            return
        self._residual += float((x - x_hat).double().square().sum())
        x = x.double()
        batch_mean = x.mean(0)
        batch_spread = float((x - batch_mean).square().sum())
        n, b = self.rows, len(x)
        # Chan et al.'s merge of two (count, mean, spread) summaries: no catastrophic
        # cancellation when the mean is large, unlike E[x^2] - E[x]^2
        delta = batch_mean - self._mean
        self._spread += batch_spread + float(delta.square().sum()) * n * b / (n + b)
        self._mean = self._mean + delta * (b / (n + b))
        self.rows += b

    def result(self) -> float:
        """The FVU of the rows seen."""
        # constant rows leave rounding-level spread about a mean that is off by an ulp
        varies = self._spread > _STILL**2 * self.rows * float(self._mean.square().sum())
        return self._residual / self._spread if varies else math.nan


class DeadLatents:
    """How many rows each latent fired on (was nonzero) over a stream of code batches;
    a latent is dead when it fired on none of the rows seen (the window)."""

    def __init__(self) -> None:
        self.rows = 0
        self.fire_counts: torch.Tensor | None = None

    def update(self, z: Any) -> None:
        z = _matrix(z, "codes")
        fired = (z != 0).sum(0)
        if self.fire_counts is None:
            self.fire_counts = fired.to(torch.int64)
        elif len(fired) != len(self.fire_counts):
            raise ShapeError(
                f"codes: expected {len(self.fire_counts)} latents as before; got {len(fired)}"
            )
        else:
            self.fire_counts += fired
        self.rows += len(z)

    @property
    def density(self) -> torch.Tensor:
        """Each latent's firing frequency over the window."""
        if self.fire_counts is None:
            raise ShapeError("DeadLatents: no codes seen yet")
        return self.fire_counts.double() / max(self.rows, 1)

    @property
    def l0(self) -> float:
        """Mean number of latents that fired per row over the window."""
        return float(self.density.sum())

    @property
    def dead(self) -> int:
        """Latents that never fired in the window."""
        return int((self.density == 0).sum())

    @property
    def dead_fraction(self) -> float:
        return self.dead / len(self.density)


class NormRatio:
    """Shrinkage: the mean over rows of ``||x_hat - c|| / ||x - c||`` (L2 norms per row;
    1 = no shrinkage, below 1 = reconstructions shorter than the inputs, the bias an L1
    penalty causes). With ``c = 0`` (the default) this is the usual ``l2_ratio`` of SAE
    evaluations; ``c = b_dec`` measures only the part the latents write, which is what
    the penalty shrinks, and is not masked by a large mean in the data. Rows with
    ``||x - c|| = 0`` have no ratio and are left out."""

    def __init__(self, center: Any = None) -> None:
        self.center = None if center is None else torch.as_tensor(center)
        self.rows = 0
        self._total = 0.0

    def update(self, x: Any, x_hat: Any) -> None:
        x, x_hat = _pair(x, x_hat, "x, x_hat")
        if self.center is not None:
            center = self.center.to(x.device, x.dtype).reshape(-1)
            if center.shape != x.shape[1:]:
                raise ShapeError(f"center: expected {x.shape[1]} values; got {len(center)}")
            x, x_hat = x - center, x_hat - center
        norm_in, norm_out = x.double().norm(dim=1), x_hat.double().norm(dim=1)
        keep = norm_in > 0
        self._total += float((norm_out[keep] / norm_in[keep]).sum())
        self.rows += int(keep.sum())

    def result(self) -> float:
        return self._total / self.rows if self.rows else math.nan


class MeanCorrelation:
    """Mean correlation coefficient (MCC) between true feature activations and codes,
    over a stream of batches of the same rows.

    The Pearson correlation of every true feature with every latent over all rows seen
    (0 where either never varies), then the one-to-one matching of true features to
    latents with the largest total correlation (``linear_sum_assignment``); MCC is the
    mean correlation of the matched pairs (``min(n_true, n_latents)`` of them).
    Correlations are signed: a latent that fires when a feature is off counts against.

    Kept: in float64, the sums, sums of squares and cross products of both sides,
    shifted by the first batch's means so that a large mean cannot cancel them away.
    """

    def __init__(self) -> None:
        self.rows = 0
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: list[torch.Tensor] = []

    def update(self, true_activations: Any, codes: Any) -> None:
        t, z = _pair(true_activations, codes, "true_activations, codes", same_width=False)
        if len(t) == 0:
            return
        z = z.to(t.device)
        dtype = torch.promote_types(t.dtype, z.dtype)
        if self._shift is None:
            self._shift = (t.double().mean(0), z.double().mean(0))
        elif (t.shape[1], z.shape[1]) != (len(self._shift[0]), len(self._shift[1])):
            raise ShapeError(
                f"true_activations, codes: expected {len(self._shift[0])} and "
                f"{len(self._shift[1])} columns as before; got {t.shape[1]} and {z.shape[1]}"
            )
        t, z = t.to(dtype) - self._shift[0].to(dtype), z.to(dtype) - self._shift[1].to(dtype)
        # one batch's products in the inputs' precision, the running sums in float64
        terms = [t.sum(0), z.sum(0), t.square().sum(0), z.square().sum(0), t.T @ z]
        terms = [term.double() for term in terms]
        self._sums = terms if not self._sums else [a + b for a, b in zip(self._sums, terms)]
        self.rows += len(t)

    def correlations(self) -> torch.Tensor:
        """Pearson correlations, (n_true, n_latents) float64."""
        if not self.rows:
            raise ShapeError("MeanCorrelation: no rows seen yet")
        s_t, s_z, ss_t, ss_z, cross = (s / self.rows for s in self._sums)
        var_t, var_z = (ss_t - s_t.square()).clamp_min(0), (ss_z - s_z.square()).clamp_min(0)
        # a column that never varies still has rounding-level variance about its shift
        varies_t = var_t > (_STILL * (self._shift[0] + s_t)).square()
        varies_z = var_z > (_STILL * (self._shift[1] + s_z)).square()
        cov = cross - torch.outer(s_t, s_z)
        scale = torch.outer(var_t, var_z).sqrt().clamp_min(1e-300)
        varies = torch.outer(varies_t, varies_z)
        return torch.where(varies, cov / scale, torch.zeros_like(cov)).clamp(-1.0, 1.0)

    def matching(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The matched pairs: true feature indices, latent indices, their correlations."""
        from scipy.optimize import linear_sum_assignment

        corr = self.correlations().cpu().numpy()
        true_index, latent_index = linear_sum_assignment(corr, maximize=True)
        return true_index, latent_index, corr[true_index, latent_index]

    def result(self) -> float:
        """The MCC of the rows seen."""
        return float(self.matching()[2].mean())


def _feed(acc, batch_size: int, names: str, *arrays: Any):
    """``acc`` updated with the arrays' rows, ``batch_size`` at a time: each batch is
    converted on its own, so a memory map is never read whole."""
    arrays = tuple(a if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays)
    if len({len(a) for a in arrays}) > 1:
        raise ShapeError(f"{names}: expected the same rows; got {[len(a) for a in arrays]} rows")
    for rows in _batches(len(arrays[0]), batch_size):
        acc.update(*(a[rows] for a in arrays))
    return acc


def fvu(x: Any, x_hat: Any, *, batch_size: int = BATCH_SIZE) -> float:
    """Fraction of variance unexplained (see ``VarianceUnexplained``)."""
    return _feed(VarianceUnexplained(), batch_size, "x, x_hat", x, x_hat).result()


def explained_variance(x: Any, x_hat: Any, *, batch_size: int = BATCH_SIZE) -> float:
    """``1 - fvu(x, x_hat)``."""
    return 1.0 - fvu(x, x_hat, batch_size=batch_size)


def l0(z: Any, *, batch_size: int = BATCH_SIZE) -> float:
    """Mean number of nonzero latents per row (nonzero, not positive: signed codes count)."""
    return _feed(DeadLatents(), batch_size, "codes", z).l0 if len(z) else math.nan


def shrinkage(x: Any, x_hat: Any, *, center: Any = None, batch_size: int = BATCH_SIZE) -> float:
    """Mean ``||x_hat - center|| / ||x - center||`` over rows (see ``NormRatio``)."""
    return _feed(NormRatio(center), batch_size, "x, x_hat", x, x_hat).result()


def max_cosine_similarity(
    true_features: Any, learned: Any, *, block: int = COSINE_BLOCK
) -> torch.Tensor:
    """For each true feature (row), its largest cosine similarity with any learned
    dictionary row; (n_true,). Signed: an opposite direction does not count as found.
    A zero row has cosine 0 with everything. Built in blocks of ``block`` x ``block``."""
    true_features, learned = _matrix(true_features, "true_features"), _matrix(learned, "learned")
    if true_features.shape[1] != learned.shape[1]:
        raise ShapeError(
            f"true_features, learned: expected rows of the same dimension; got "
            f"{true_features.shape[1]} and {learned.shape[1]}"
        )
    if len(learned) == 0:
        raise ShapeError("learned: the dictionary has no rows")
    dtype = torch.promote_types(true_features.dtype, learned.dtype)
    learned = F.normalize(learned.to(true_features.device, dtype), dim=1)
    out = []
    for rows in _batches(len(true_features), block):
        part = F.normalize(true_features[rows].to(dtype), dim=1)
        best = torch.stack(
            [(part @ learned[cols].T).amax(1) for cols in _batches(len(learned), block)]
        )
        out.append(best.amax(0))
    return torch.cat(out) if out else true_features.new_zeros(0)


def mmcs(true_features: Any, learned: Any, *, block: int = COSINE_BLOCK) -> float:
    """Mean max cosine similarity: the mean over true features of
    ``max_cosine_similarity`` (1 = every true direction is a dictionary row)."""
    return float(max_cosine_similarity(true_features, learned, block=block).mean())


def mcc(true_activations: Any, codes: Any, *, batch_size: int = BATCH_SIZE) -> float:
    """Mean correlation of true activations and codes over the same rows (MeanCorrelation)."""
    names = "true_activations, codes"
    return _feed(MeanCorrelation(), batch_size, names, true_activations, codes).result()


@checked_keywords
def sae_metrics(
    model: Any,
    x: Any,
    *,
    truth: Superposition | None = None,
    rows: Any = None,
    dictionary: Any = None,
    batch_size: int = BATCH_SIZE,
) -> dict[str, float]:
    """Run ``model.encode`` (-> dense codes (B, n)) and ``model.decode`` over the rows of
    ``x`` (a tensor, an array, a memory map or an ``ArrayView``, in the units the model
    takes: for a model trained with a normalisation other than ``"none"``, rows after
    ``model.normalization.apply``, as ``aecore eval`` passes them) in batches, without
    gradients and in eval mode, and return ``fvu``, ``explained_variance``, ``l0``,
    ``dead`` and ``dead_fraction`` (over these rows), ``shrinkage`` (``NormRatio``
    about 0) and, when the model has a ``b_dec``, ``shrinkage_centered`` (about it).

    With ``truth``, the generator the rows come from, also ``mmcs`` (the true features
    against ``dictionary``, else ``model.dictionary()``, else ``model.W_dec``: rows are
    latents) and ``mcc`` (codes against the true activations of the same rows). ``rows``
    are the rows' positions in the generator's stream: by default ``x.indices`` for an
    ``ArrayView`` (a prepared split), else ``0..len(x)-1``.
    """
    n = len(x)
    if n == 0:
        raise ShapeError("x: no rows to evaluate")
    if truth is not None:
        if rows is None:  # a tensor's ``indices`` is a method (of sparse tensors), not rows
            rows = x.indices if isinstance(x, ArrayView) else np.arange(n)
        rows = np.asarray(rows)
        if rows.shape != (n,):
            raise ShapeError(f"rows: expected {n} stream positions, one per row; got {rows.shape}")
        learned = _dictionary(model, dictionary, truth.d)
    # run where the model's weights are, in their precision
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    on_weights = first is not None and first.is_floating_point()
    device, dtype = (first.device, first.dtype) if on_weights else ("cpu", torch.float32)
    recon, dead, correlation = VarianceUnexplained(), DeadLatents(), MeanCorrelation()
    center = getattr(model, "b_dec", None)
    ratios = {"shrinkage": NormRatio()}
    if isinstance(center, torch.Tensor):
        # b_dec lives in the units the SAE scales inputs to; x and decode() in raw ones
        scale = getattr(model, "input_scale", None)
        center = center.detach() / scale.detach() if scale is not None else center.detach()
        ratios["shrinkage_centered"] = NormRatio(center)
    modes = eval_mode(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    with torch.inference_mode(), modes:
        for part in _batches(n, batch_size):
            batch = _tensor(x[part]).to(device, dtype)
            finite = torch.isfinite(batch.reshape(len(batch), -1)).all(1)
            if not bool(finite.all()):  # codes of NaN would skew every metric, silently
                row = part.start + int((~finite).nonzero()[0])
                raise DataError(f"x: NaN or infinite values at row {row}; drop or impute them")
            z = model.encode(batch)
            if not isinstance(z, torch.Tensor) or z.ndim != 2 or len(z) != len(batch):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ShapeError(f"model.encode: expected dense codes (B, n_latents); got {got}")
            x_flat, x_hat = batch.reshape(len(batch), -1), model.decode(z).reshape(len(batch), -1)
            for acc in (recon, *ratios.values()):
                acc.update(x_flat, x_hat)
            dead.update(z)
            if truth is not None:
                true_activations = torch.from_numpy(truth.sample_at(rows[part])[1])
                correlation.update(true_activations.to(z.device), z)
    out = {
        "fvu": recon.result(),
        "explained_variance": 1.0 - recon.result(),
        "l0": dead.l0,
        "dead": dead.dead,
        "dead_fraction": dead.dead_fraction,
        **{name: acc.result() for name, acc in ratios.items()},
    }
    if truth is not None:
        out["mmcs"] = mmcs(truth.features(), learned)
        out["mcc"] = correlation.result()
    return out


def _dictionary(model: Any, dictionary: Any, d: int) -> torch.Tensor:
    """The learned dictionary, (n_latents, d): the argument, else ``model.dictionary()``,
    else ``model.W_dec``."""
    if dictionary is None and callable(getattr(model, "dictionary", None)):
        dictionary = model.dictionary()
    if dictionary is None:
        dictionary = getattr(model, "W_dec", None)
    if dictionary is None:
        raise ConfigError(
            f"{type(model).__name__} has no dictionary() or W_dec: pass dictionary=, the "
            f"decoder's directions as (n_latents, d) rows"
        )
    t = dictionary if isinstance(dictionary, torch.Tensor) else torch.as_tensor(dictionary)
    if t.ndim != 2 or t.shape[1] != d:
        raise ShapeError(
            f"dictionary: expected (n_latents, {d}), one row per latent; got {tuple(t.shape)}"
        )
    return t.detach()
