"""From a named data source to a trained, saved, evaluated model: the steps that
``aecore train``, ``aecore eval`` and the demo share (prepare the data, train, compare
with PCA on the test split, save)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aecore import params
from aecore.config import TrainConfig
from aecore.data import ArrayView, Prepared, prepare, prepare_like
from aecore.data.prepare import normalised_scale
from aecore.data.sources import source_columns
from aecore.data.units import (
    OWN,
    check_in_model_range,
    data_units,
    hparams_for_units,
    per_feature_normalization,
)
from aecore.detection import ScoreThreshold
from aecore.errors import ConfigError, DataError, warn
from aecore.io.lock import FolderLock
from aecore.io.model_folder import save
from aecore.layers import pca_basis
from aecore.registry import create, hyperparameter_names, model_class
from aecore.training import History, Trainer
from aecore.training.checkpoint import check_split_kept
from aecore.training.trainer import writes_files

__all__ = ["TrainResult", "evaluate", "prepare", "prepare_like", "train"]

#: PCA is fitted on at most this many training rows (a seeded sample beyond that), so
#: evaluating on data larger than memory stays bounded; test errors stream over all rows
MAX_FIT_ROWS = 20000
EVAL_BATCH = 1024
#: the fewest validation rows above a ``contamination`` threshold for it to be fitted on them
MIN_ROWS_ABOVE_THRESHOLD = 5


@dataclass
class TrainResult:
    model: Any
    history: History
    prepared: Prepared
    metrics: dict[str, Any]
    config: TrainConfig


def _own_learning_rate(
    name: str, hparams: dict[str, Any], config: TrainConfig
) -> tuple[dict[str, Any], TrainConfig]:
    """A model that updates its own parameters (an RBM) takes a learning rate given to
    the trainer (``--lr``) as its own ``lr``, unless its hyperparameters set one."""
    cls = model_class(name)
    takes_lr = "lr" in (hyperparameter_names(cls) or ())
    if cls.uses_optimizer or not takes_lr or config.lr is None or "lr" in hparams:
        return hparams, config
    return {**hparams, "lr": config.lr}, config.replace(lr=None)


def train(
    name: str,
    source: str,
    out: str | Path | None,
    *,
    latent_dim: int = 8,
    hparams: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    normalize: str = "auto",
    split: str = "random",
    resume: bool = False,
    allow_changes: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    trainer_hook=None,
    contamination: float | None = None,
    **settings: Any,
) -> TrainResult:
    """Train registry model ``name`` on ``source`` (split 70/10/20 with the config's
    seed and ``val_fraction``, ``split="stratified"`` by label; ``val_fraction=0`` gives
    80/0/20 without early stopping; normalisation fitted on the train rows, ``"auto"``:
    the model's ``default_normalize``, else each feature rescaled where the features are
    in units of their own (with the model's ``real_valued_hparams``), else min-max as a
    whole) and save it to ``out`` when given.

    Training settings are ``config`` (default ``TrainConfig()``) with ``settings``
    (its field names) on top; ``trainer_hook(trainer)`` runs before training starts.
    ``contamination`` also fits an anomaly threshold, saved with the model: the score
    (the model's default kind) above which that share of the validation rows lies (of
    the training rows where the validation rows are too few; ``metrics["threshold_rows"]``
    says which), what ``aecore predict`` and the detector methods of a served model use.
    """
    config = (config or TrainConfig()).replace(**settings)
    if contamination is not None:  # before training: not after hours of it
        contamination = params.number("contamination", contamination, low=0.0, high=0.5,
                                      low_open=True)  # fmt: skip
    hparams = dict(hparams or {})
    for key, source_of in (
        ("latent_dim", "latent_dim= (--latent-dim)"),
        ("input_shape", "the data"),
    ):
        if key in hparams:
            raise ConfigError(f"{key} comes from {source_of}, not from the hyperparameters (--set)")
    hparams, config = _own_learning_rate(name, hparams, config)
    if normalize == "auto":  # the model's preference (activations keep their geometry)
        normalize = getattr(model_class(name), "default_normalize", "auto")
    prepared = prepare(
        source, normalize="minmax" if normalize == "auto" else normalize, seed=config.seed,
        split=split, val_fraction=config.val_fraction,
    )  # fmt: skip
    _warn_if_channels_last(source, prepared.dataset.shape)
    # features in units of their own (a table of measurements) are each rescaled, other
    # data keeps its geometry; models with Bernoulli units get Gaussian ones on
    # real-valued data (neither in [0, 1] nor intensities such as pixel counts)
    train_rows = ArrayView(prepared.dataset.x, prepared.split.train, raw=True)
    units = data_units(train_rows) if normalize == "auto" else None
    own_units = units == OWN
    if units is not None:
        hparams = hparams_for_units(model_class(name), units, hparams)
    torch.manual_seed(config.seed)  # the model's initial weights follow the seed too
    model = create(name, input_shape=prepared.dataset.shape, latent_dim=latent_dim, **hparams)
    if getattr(model, "overcomplete", False) and model.latent_dim <= model.input_size:
        warn(
            f"{name} learns a dictionary of {model.latent_dim} latents for "
            f"{model.input_size}-dimensional rows, no wider than they are (PCA does as well "
            f"with as many components): sparse dictionaries are usually several times "
            f"wider; pass --latent-dim (latent_dim=)",
            UserWarning,
        )
    _warn_if_code_copies(model, name, "--latent-dim (latent_dim=)")
    if own_units:
        prepared.normalization = per_feature_normalization(model.input_range, train_rows)
        prepared.record.update(normalize=prepared.normalization.kind, per_feature=True)
    model.normalization = prepared.normalization
    prepared.record["normalised_scale"] = normalised_scale(prepared, "train")  # for eval
    columns = source_columns(source)  # a CSV's header: served CSVs must name them so
    if columns is not None and len(columns) == model.input_size:
        model.feature_names = columns
    if model.input_range is not None:  # a bounded model is served rows clipped to it
        lo, hi = _value_range(prepared.view("train"))
        check_in_model_range(model.input_range, lo, hi, prepared.normalization.kind, name)
    config = config.for_model(model)  # the learning rate the run uses, recorded
    if resume and out is not None:  # the split follows these: a resume keeps them
        check_split_kept(Path(out), config, ("seed", "val_fraction"))
    trainer = Trainer(
        config, out_dir=out, resume=resume, allow_changes=allow_changes, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip
    if trainer_hook is not None:
        trainer_hook(trainer)
    # the split's validation rows (with val_fraction=0 there are none, nor a hold-out)
    # (held to the model's input range, as served rows are: a row beyond the training
    # rows' min-max range would be refused by a model with Bernoulli units)
    val = prepared.view("val", model.input_range) if len(prepared.split.val) else None
    # the folder is this run's from the first file written to the saved model
    lock = FolderLock(out, "train into") if out is not None and writes_files() else nullcontext()
    with lock:
        history = trainer.fit(model, prepared.view("train"), val)
        model.cpu().eval()
        metrics = evaluate(model, prepared)
        metrics["best_epoch"] = history.best_epoch
        metrics["kept_epoch"] = history.kept_epoch
        metrics["epochs_run"] = len(history.epochs)
        if history.changes:  # settings a resume changed (allow_changes)
            metrics["training_changes"] = history.changes
        if contamination is not None:
            try:  # the trained model is saved whatever the threshold's fate
                model.detector, metrics["threshold_rows"] = _fit_detector(
                    model, prepared, val, contamination
                )
            except DataError as exc:
                warn(f"no anomaly threshold saved with the model: {exc}", UserWarning)
        if out is not None and history.is_main:  # under torchrun, rank 0 writes
            save(model, out, metrics=metrics, data=prepared.record, training=config, overwrite=True)
    return TrainResult(model, history, prepared, metrics, config)


def _warn_if_code_copies(model, name: str, setting: str) -> None:
    """A bottleneck model (one the registry starts at PCA, without a sparsity penalty: a
    sparse code wider than its rows is meant) whose code is as wide as its rows: it can
    learn to copy them, and its reconstruction error then tells rows apart no more."""
    bottleneck = getattr(type(model), "pca_start", False) and not hasattr(model, "penalty")
    if bottleneck and model.latent_dim >= model.input_size:
        warn(
            f"{name} has a code of {model.latent_dim} for rows of {model.input_size} values: a "
            f"code as wide as its input can copy it, so its reconstruction error tells nothing "
            f"about a row (an outlier scores as low as the rest); pass a smaller {setting}, "
            f"such as {max(1, model.input_size // 2)}",
            UserWarning,
        )


@torch.no_grad()
def _fit_detector(model, prepared, val, contamination: float) -> tuple[ScoreThreshold, str]:
    """The threshold flagging ``contamination`` of the validation rows by the model's
    default score, as ``aecore.AnomalyDetector`` fits one, and which rows it was fitted
    on. The model never trained on those: it scores the rows it trained on lower than new
    ones (``ae`` on digits, thresholded on its training rows at 0.1, flagged 37% of the
    test rows; on the validation rows, about 0.1). Where fewer than
    ``MIN_ROWS_ABOVE_THRESHOLD`` validation rows would lie above it, the training rows',
    with a warning."""
    part = (
        "val"
        if val is not None and len(val) * contamination >= MIN_ROWS_ABOVE_THRESHOLD
        else "train"
    )
    rows = val if part == "val" else prepared.view("train")
    if part == "train":
        held = 0 if val is None else len(val)
        warn(
            f"the anomaly threshold is fitted on the training rows, which the model scores "
            f"lower than new ones: expect more than {contamination:g} of new normal rows "
            f"flagged. A calibrated one needs {math.ceil(MIN_ROWS_ABOVE_THRESHOLD / contamination)} "
            f"validation rows (at least {MIN_ROWS_ABOVE_THRESHOLD} above the threshold); "
            f"there are {held}: raise val_fraction (--val-fraction)",
            UserWarning,
        )
    scores = [
        model.score(torch.as_tensor(rows[np.arange(i, min(i + EVAL_BATCH, len(rows)))]))
        for i in range(0, len(rows), EVAL_BATCH)
    ]
    threshold = ScoreThreshold.fit(
        torch.cat(scores).numpy(), contamination, model.default_score_kind
    )
    return threshold, part


def _warn_if_channels_last(source: str, shape: tuple[int, ...]) -> None:
    """Images stored (H, W, C), as image libraries write them, would train as H channels
    of W x C images without a word."""
    # (a last axis smaller than both others: small images (4, 4, 3) too)
    if len(shape) == 3 and shape[2] in (1, 3, 4) and min(shape[0], shape[1]) > shape[2]:
        h, w, c = shape
        warn(
            f"{source}: rows of shape {shape} look like images with their channels last; "
            f"models take (C, H, W): store them as (N, {c}, {h}, {w}) "
            f"(x.transpose(0, 3, 1, 2)) if so",
            UserWarning,
        )


def _value_range(view: ArrayView, rows: int = 65536) -> tuple[float, float]:
    """The smallest and largest normalised value of ``view``'s rows (read in chunks)."""
    lo, hi = np.inf, -np.inf
    for start in range(0, len(view), rows):
        block = view[np.arange(start, min(start + rows, len(view)))]
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi


def _sample_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


@torch.no_grad()
def evaluate(model, prepared: Prepared) -> dict[str, Any]:
    """Test reconstruction MSE (per element, normalised units) of ``model`` and of PCA
    with the same code size fitted on the same training rows (those the model learns
    from; the validation rows only choose its weights), streamed over the test split in
    batches; plus the model's own ``evaluation_metrics``."""
    model.eval()
    fit_rows = _sample_rows(prepared.split.train, MAX_FIT_ROWS, 0)
    fit = ArrayView(prepared.dataset.x, fit_rows, prepared.normalization).to_numpy()
    mean, comps = (t.numpy() for t in pca_basis(torch.from_numpy(fit), model.latent_dim))
    test = prepared.view("test", model.input_range)  # as served rows are held
    model_sq = pca_sq = 0.0
    count = 0
    for start in range(0, len(test), EVAL_BATCH):
        xb = test[np.arange(start, min(start + EVAL_BATCH, len(test)))]
        t = torch.as_tensor(xb)
        model_sq += float((model(t) - t).pow(2).sum())
        flat = xb.reshape(len(xb), -1).astype(np.float64)
        rec = (flat - mean) @ comps.T @ comps + mean
        pca_sq += float(np.square(rec - flat).sum())
        count += xb.size
    result: dict[str, Any] = {
        "test_mse": model_sq / count,
        "pca_test_mse": pca_sq / count,
        "test_rows": len(test),
    }
    # with a code as wide as the input PCA reconstructs exactly: no meaningful ratio
    exact = result["pca_test_mse"] <= 1e-9 * max(result["test_mse"], 1e-300)
    result["ratio_to_pca"] = None if exact else result["test_mse"] / result["pca_test_mse"]
    extra = getattr(model, "evaluation_metrics", None)
    if extra is not None:
        sample = _sample_rows(np.arange(len(test)), MAX_FIT_ROWS, 1)
        result.update(extra(torch.as_tensor(test[sample]), prepared))
    return result
