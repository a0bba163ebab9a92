"""From a named data source to a trained, saved, evaluated model: the steps the CLI
and the demo share (load, split, normalise, train, save, compare with PCA)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aecore.data import ArrayView, Dataset, Split, load_data, split_indices
from aecore.errors import ShapeError
from aecore.normalization import Normalization


@dataclass
class TrainResult:
    model: Any
    history: Any
    prepared: Prepared
    metrics: dict[str, Any]
    is_main: bool = True


@dataclass
class Prepared:
    """A data source split into normalised train/val/test views."""

    dataset: Dataset
    split: Split
    normalization: Normalization
    record: dict[str, Any]

    def view(self, part: str) -> ArrayView:
        return ArrayView(self.dataset.x, getattr(self.split, part), self.normalization)

    def labels(self, part: str) -> np.ndarray | None:
        if self.dataset.labels is None:
            return None
        return self.dataset.labels[getattr(self.split, part)]


def prepare(
    source: str,
    *,
    normalize: str = "minmax",
    per_feature: bool | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Prepared:
    """Load ``source``, split it (seeded), fit the normalisation on the train rows."""
    dataset = load_data(source)
    split = split_indices(
        len(dataset), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    norm = Normalization.fit(normalize, ArrayView(dataset.x, split.train, raw=True), per_feature)
    record = {
        "source": source,
        "rows": len(dataset),
        "shape": list(dataset.shape),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "normalize": normalize,
        "per_feature": per_feature,
        "split": split.to_dict(),
    }
    return Prepared(dataset, split, norm, record)


def prepare_like(model_record: dict[str, Any], source: str | None = None) -> Prepared:
    """The same split and normalisation a saved model was trained with (on ``source``
    if given, else on the source it was trained on)."""
    data = model_record.get("data") or {}
    if source is None and "source" not in data:
        raise ShapeError("the model folder does not say what data it was trained on; pass --data")
    prepared = prepare(
        source or data["source"],
        normalize=data.get("normalize", "none"),
        per_feature=data.get("per_feature"),
        val_fraction=data.get("val_fraction", 0.1),
        test_fraction=data.get("test_fraction", 0.2),
        seed=data.get("seed", 0),
    )
    # inference always uses the normalisation stored with the model
    prepared.normalization = Normalization.from_dict(model_record.get("normalization"))
    return prepared


def train(
    name: str,
    source: str,
    out: str | Path | None,
    *,
    latent_dim: int = 8,
    hparams: dict[str, Any] | None = None,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    patience: int | None = 20,
    normalize: str = "minmax",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    checkpoint_every: int | None = None,
    trainer_hook=None,
    optimizer: str = "adam",
):
    """Train registry model ``name`` on ``source``; save it to ``out`` when given."""
    from aecore.io import save
    from aecore.registry import create
    from aecore.trainer import Trainer

    prepared = prepare(source, normalize=normalize, seed=seed)
    torch.manual_seed(seed)  # the model's initial weights follow the seed too
    model = create(
        name, input_shape=prepared.dataset.shape, latent_dim=latent_dim, **(hparams or {})
    )
    model.normalization = prepared.normalization
    trainer = Trainer(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        out_dir=out,
        patience=patience,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        checkpoint_every=checkpoint_every,
        optimizer=optimizer,
    )
    if trainer_hook is not None:
        trainer_hook(trainer)
    history = trainer.fit(model, prepared.view("train"), prepared.view("val"))
    model.cpu().eval()
    metrics = evaluate(model, prepared)
    metrics["best_epoch"] = history.best_epoch
    metrics["epochs_run"] = len(history.epochs)
    if out is not None and trainer.is_main:  # under torchrun, rank 0 writes
        save(model, out, metrics=metrics, data=prepared.record, overwrite=True)
    return TrainResult(model, history, prepared, metrics, trainer.is_main)


#: PCA is fitted on at most this many train+val rows (a seeded sample beyond that), so
#: evaluating on data larger than memory stays bounded; test errors stream over all rows
MAX_FIT_ROWS = 20000
EVAL_BATCH = 1024


def pca_basis(fit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-``k`` principal directions (rows) of ``fit``."""
    a = fit.reshape(len(fit), -1).astype(np.float64)
    mean = a.mean(0)
    _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
    return mean, vt[: min(k, vt.shape[0])]


def _sample_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


@torch.no_grad()
def evaluate(model, prepared: Prepared) -> dict[str, Any]:
    """Test reconstruction MSE (per element, normalised units) of ``model`` and of PCA
    with the same code size fitted on the same train+val rows, streamed over the test
    split in batches."""
    model.eval()
    fit_rows = _sample_rows(
        np.concatenate([prepared.split.train, prepared.split.val]), MAX_FIT_ROWS, 0
    )
    mean, comps = pca_basis(
        ArrayView(prepared.dataset.x, fit_rows, prepared.normalization).to_numpy(),
        model.latent_dim,
    )
    test = prepared.view("test")
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
