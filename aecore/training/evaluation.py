"""A model's losses on held-out rows, judged in eval mode under a fixed RNG stream (so
stochastic losses compare across epochs and weights, and training's RNG is untouched),
and the paired test that decides whether trained weights beat a known start."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from aecore.base import eval_mode
from aecore.data.dataset import layout_hint
from aecore.errors import ConfigError, DataError, ShapeError, TrainingError, warn

#: rows per chunk in the paired comparison, and the standard errors by which trained
#: weights must beat a known start
CHUNK_ROWS = 8
START_MARGIN = 2.0
#: input elements per model call when averaging losses over many batches
EVAL_ELEMENTS = 2**20


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, for a CUDA device, that device's: the generators a
    run on ``device`` draws from. (``torch.manual_seed`` reseeds every device's, and on a
    machine without CUDA costs a millisecond queueing a lazy CUDA seed with its stack
    trace.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextmanager
def judging(model, seed: int, device: torch.device) -> Iterator[None]:
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            # only the generators fork_rng restores
            seed_device(seed + 7919, device)
            yield
    finally:
        model.train(was_training)


def _merged(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches`` joined into runs of up to EVAL_ELEMENTS elements (never splitting
    one): evaluating needs no small steps, and a model call costs the same fixed overhead
    for 64 rows as for thousands."""
    run: list[torch.Tensor] = []
    size = 0
    for x in batches:
        if run and size + x.numel() > EVAL_ELEMENTS:
            yield run[0] if len(run) == 1 else torch.cat(run)
            run, size = [], 0
        run.append(x)
        size += x.numel()
    if run:
        yield run[0] if len(run) == 1 else torch.cat(run)


def divergence_advice(named: Callable[[str], str | None] = str) -> str:
    """What to change when the weights diverge, in the caller's names for the settings
    (an estimator offers no gradient clipping)."""
    clip = named("grad_clip")
    return "lower the learning rate" + (f" or set {clip}" if clip else "")


def check_validation_loss(loss: float, val, step: int, named=str) -> None:
    """A validation loss that is not finite: the validation rows' fault where they hold
    NaN or infinities, else the weights' (they diverged)."""
    if math.isfinite(loss):
        return
    if any(not bool(torch.isfinite(x).all()) for x in val.epoch(0)):
        raise DataError(
            f"the validation loss is {loss}: the validation data (val_data, or the rows "
            f"held out from data) holds NaN or infinite values; clean them"
        )
    if step == 0:  # the start's weights: the rows' scale overflows the model
        raise DataError(
            f"the validation loss is {loss} before any training step: the model overflows "
            f"on rows of this scale (up to {max(float(x.abs().max()) for x in val.epoch(0)):.3g}"
            f"); normalise the data (normalize='auto' or 'standardize')"
        )
    raise TrainingError(
        f"the validation loss is {loss} after {step} training steps: the weights diverged "
        f"(or overflow on these rows); {divergence_advice(named)}"
    )


def check_first_batch(model, train, given) -> None:
    """The training batches' first, checked against the model's input shape and range
    before anything trains; ``given``: the batches of all the rows given to fit."""
    x = next(train.epoch(0), None)
    if x is None:
        raise DataError(
            "the training data yields no batches (a DataLoader with drop_last=True and "
            "a batch_size larger than its rows?)"
        )
    try:
        model.check_input(x.to(input_dtype(model)))
    except ShapeError as exc:
        of = f" of the data's {given.n} rows" if given.loader is None else ""
        hint = layout_hint(tuple(x.shape), model.input_shape)
        raise ShapeError(
            f"the data does not fit the model: {exc} (its first batch{of}){hint}"
        ) from None
    check_in_input_range(model, x)
    _check_normalization(model, x)
    device = next((p.device for p in model.parameters()), x.device)
    check_output_shapes(model, x[:2].to(device, input_dtype(model)))


def _check_normalization(model, x: torch.Tensor) -> None:
    """The normalisation a model carries (saved and served with it: data units in): one
    that does not fit the model is refused; rows it would shrink tenfold and more (pixels
    0..255 under a min-max by 255) are warned about: the model would train on data units
    and be served normalised ones."""
    normalization = getattr(model, "normalization", None)
    if normalization is None or normalization.kind == "none" or x.is_complex():
        return
    try:  # it is saved and served with the model: a misfit named before training
        normalization.check_features(model.input_size)
    except ValueError as exc:
        raise ConfigError(f"{type(model).__name__}.normalization does not fit: {exc}") from None
    rows = x.detach().cpu().double().numpy()
    given = float(np.sqrt(np.mean(rows**2)))
    applied = float(np.sqrt(np.mean(normalization.apply(rows) ** 2)))
    if given > 10 and 0.01 < applied < min(10.0, given / 10):
        warn(
            f"{type(model).__name__}.normalization ({normalization.kind}) is applied to data "
            f"before the saved or served model, but Trainer.fit trains on rows as given, and "
            f"these look like data units (root mean square {given:.3g}; normalised, "
            f"{applied:.3g}): pass model.normalization.apply(rows)",
            UserWarning,
        )


def check_output_shapes(model, x: torch.Tensor) -> None:
    """A ShapeError unless ``encode`` gives (B, latent_dim) codes and ``decode`` rows of
    the input's shape, on a couple of rows in eval mode (a plugin's wrong width would
    otherwise train, save and serve codes of another width)."""
    name = type(model).__name__
    devices = [x.device] if x.device.type == "cuda" else []
    # forked: a model drawing noise in eval mode must not shift the run's random stream
    with torch.random.fork_rng(devices), torch.no_grad(), eval_mode(model):
        z = model.encode(x)
        want = (len(x), model.latent_dim)
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != want:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else f"a {type(z).__name__}"
            raise ShapeError(f"{name}.encode gave {got} for {len(x)} rows; expected {want}")
        x_hat = model.decode(z)
        if not isinstance(x_hat, torch.Tensor) or x_hat.shape != x.shape:
            got = tuple(x_hat.shape) if isinstance(x_hat, torch.Tensor) else type(x_hat).__name__
            raise ShapeError(f"{name}.decode gave {got}; expected {tuple(x.shape)}")


def check_in_input_range(model, x: torch.Tensor) -> None:
    """Rows outside the range a bounded model takes (its ``input_range``: sigmoid or
    clipped outputs, Bernoulli units) train it on what it can never reconstruct, and a
    cross-entropy loss goes negative: refused, as the estimators and ``aecore train``
    refuse them. A model with a data policy of its own (``check_training_data``: the
    RBM's clipping with a warning, or ``strict``) applies that instead."""
    bounds = getattr(model, "input_range", None)
    if bounds is None or not x.numel() or hasattr(model, "check_training_data"):
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < bounds[0] or hi > bounds[1]:
        raise DataError(
            f"the training rows reach [{lo:.4g}, {hi:.4g}], but {type(model).__name__} with "
            f"these settings takes inputs in [{bounds[0]:g}, {bounds[1]:g}] (its input_range): "
            f"scale them into it (pixels / 255, say), or choose settings for real values"
        )


def loss_terms(model, terms, method: str = "loss") -> dict:
    """``terms``, what ``model.loss`` (or ``method``) returned, if it keeps the contract:
    a dict of scalar tensors with a ``"loss"`` entry (a plugin's float or bare tensor
    named here, not deep in the trainer). A ``train_step`` (an own update rule, no
    autograd) may report plain numbers."""
    if method != "loss" and isinstance(terms, dict):
        terms = {k: torch.tensor(float(v)) if _is_number(v) else v for k, v in terms.items()}
    if isinstance(terms, dict) and "loss" in terms:
        bad = [k for k, v in terms.items() if not (isinstance(v, torch.Tensor) and v.numel() == 1)]
        if not bad:
            return terms
        value = terms[bad[0]]
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        got = f"{bad[0]!r} as {type(value).__name__}{shape}"
    else:
        got = (
            f"the entries {sorted(map(str, terms))} but no 'loss'"
            if isinstance(terms, dict)
            else f"a {type(terms).__name__}"
        )
    raise TrainingError(
        f"{type(model).__name__}.{method} must return a dict of scalar tensors with a 'loss' "
        f"entry (the objective; other entries are logged); got {got}"
    )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def input_dtype(model) -> torch.dtype:
    """The dtype batches reach the model in: its own (a float64 model sees float64 rows,
    not rows rounded to float32 first)."""
    dtype = model.float_dtype() if hasattr(model, "float_dtype") else None
    return dtype or torch.float32


def mean_losses(
    model, batches: Iterable[torch.Tensor], seed: int, device: torch.device
) -> dict[str, float]:
    """Row-weighted mean of each loss term over ``batches``."""
    sums: dict[str, float] = {}
    count = 0
    with judging(model, seed, device):
        for x in _merged(batches):
            x = x.to(device, input_dtype(model))
            for k, v in loss_terms(model, model.loss(x)).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
            count += len(x)
    return {k: v / count for k, v in sums.items()}


def chunk_losses(
    model, batches: Iterable[torch.Tensor], seed: int, device: torch.device
) -> np.ndarray:
    """The loss of each chunk of CHUNK_ROWS rows of ``batches``."""
    losses = []
    with judging(model, seed, device):
        for x in batches:
            for chunk in x.to(device, input_dtype(model)).split(CHUNK_ROWS):
                losses.append(float(loss_terms(model, model.loss(chunk))["loss"]))
    return np.asarray(losses, dtype=np.float64)


def clearly_lower(trained: np.ndarray, start: np.ndarray) -> bool:
    """Whether paired chunk losses ``trained`` are below ``start`` by more than
    START_MARGIN standard errors of the mean difference (a one-sided paired test).

    Where every loss is positive the test compares their logarithms: chunks of hard rows
    have losses (and gains) many times those of easy ones, so absolute gains that are
    each a large fraction of their chunk's loss can still spread too widely to pass."""
    trained = np.asarray(trained, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    if len(trained) and min(trained.min(), start.min()) > 0:
        trained, start = np.log(trained), np.log(start)
    gain = start - trained
    if len(gain) < 2:
        return False
    se = float(gain.std(ddof=1)) / math.sqrt(len(gain))
    return float(gain.mean()) > START_MARGIN * se
