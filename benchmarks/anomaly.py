"""``aecore bench anomaly``: one-class anomaly detection, aecore's detectors with their
defaults beside PyOD's, in one run on the same splits.

The protocol: a stratified 80/20 split (seed 0); a detector trains on the training rows
of one class (the normal one) and scores every test row; the ROC-AUC of "not the
normal class" over the test split is the result, averaged over the normal classes.

* ``digits``: scikit-learn's 8x8 digits scaled to [0, 1], each digit in turn normal;
* ``cancer``: scikit-learn's breast-cancer data in its own units, benign normal;
* ``wine``: scikit-learn's wine data, thirteen quantities in units of their own (from
  hue near 1 to proline near 1000), each cultivar in turn normal.

aecore: ``aecore.AnomalyDetector(model, latent_dim=..., epochs=..., random_state=seed)``,
every other setting at its default. PyOD (when installed): AutoEncoder and VAE (the same
epochs; the VAE's latent_dim too), KNN, IForest and PCA at their defaults, each on the
rows as given (``raw``) and ``standardized`` with the training rows' mean and standard
deviation, as PyOD's own benchmark prepares every data set (``--pyod-inputs``): on a table
of quantities in units of their own, a distance on the raw rows is decided by whichever
features have the largest unit (the tumour areas in the breast-cancer data). ``--seeds``
(default 0) repeats every seeded detector with each seed: the AUC is the mean over
seeds and normal classes, the fit time the mean per seed (KNN and PCA draw nothing and
run once). Each detector fits once untimed before its timed fits. Torch and numpy's
BLAS run ``--threads`` threads (default 1).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import numpy as np

from aecore.cli.tables import print_table
from aecore_benchmarks.args import count, json_file, names, naturals, write_json

DATASETS = ("digits", "cancer", "wine")
AECORE_MODELS = ("ae", "vae", "denoising", "rbm")
PYOD_MODELS = ("AutoEncoder", "VAE", "KNN", "IForest", "PCA")
PYOD_INPUTS = ("raw", "standardized")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore bench anomaly", description=__doc__.split("\n\n")[0])
    import aecore

    vector_models = aecore.list_models(requires="vector")
    p.add_argument("--datasets", type=names(DATASETS), default=list(DATASETS))
    p.add_argument(
        "--models", type=names(vector_models), default=list(AECORE_MODELS), help="aecore models"
    )
    p.add_argument("--pyod", type=names(PYOD_MODELS), default=list(PYOD_MODELS), help="'' for none")
    p.add_argument(
        "--pyod-inputs", type=names(PYOD_INPUTS), default=list(PYOD_INPUTS),
        help="what PyOD's detectors see: raw (the rows as given), standardized, or both "
        "(default: raw,standardized)",
    )  # fmt: skip
    p.add_argument("--epochs", type=count, default=100)
    p.add_argument("--latent-dim", type=count, default=8)
    p.add_argument("--classes", type=count, default=None, help="digits: only the first N classes")
    p.add_argument("--seeds", type=naturals, default=[0], help="comma-separated random_state")
    p.add_argument("--threads", type=count, default=1)
    p.add_argument("--json", type=json_file, default=None, metavar="FILE")
    return p


def one_class_tasks(dataset: str, classes: int | None):
    """(name, train rows, test rows, test labels: 1 = anomaly) per normal class."""
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine
    from sklearn.model_selection import train_test_split

    if dataset == "digits":
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        normals = range(10 if classes is None else classes)
    elif dataset == "cancer":
        X, y = load_breast_cancer(return_X_y=True)
        normals = [1]  # benign
    elif dataset == "wine":
        X, y = load_wine(return_X_y=True)
        normals = range(3)
    else:
        raise SystemExit(f"unknown data set {dataset!r}: expected {', '.join(DATASETS)}")
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    for c in normals:
        yield f"{dataset}:{c}", X_tr[y_tr == c], X_te, (y_te != c).astype(int)


def standardized(tasks):
    """``tasks`` with each feature centred and scaled by the training rows' mean and
    standard deviation (a constant feature: centred only)."""
    for name, train, test, anomalous in tasks:
        mean, std = train.mean(axis=0), train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        yield name, (train - mean) / std, (test - mean) / std, anomalous


def aecore_detector(name: str, args):
    import aecore

    def make(seed):
        return aecore.AnomalyDetector(
            name, latent_dim=args.latent_dim, epochs=args.epochs, random_state=seed
        )

    return make, True


def pyod_detector(name: str, args):
    """(maker of the detector from a seed, whether the seed changes anything)."""
    if name == "AutoEncoder":
        from pyod.models.auto_encoder import AutoEncoder

        return lambda seed: AutoEncoder(epoch_num=args.epochs, verbose=0, random_state=seed), True
    if name == "VAE":
        from pyod.models.vae import VAE

        return lambda seed: VAE(
            epoch_num=args.epochs, latent_dim=args.latent_dim, verbose=0, random_state=seed
        ), True
    if name == "KNN":
        from pyod.models.knn import KNN

        return lambda seed: KNN(), False
    if name == "IForest":
        from pyod.models.iforest import IForest

        return lambda seed: IForest(random_state=seed), True
    if name == "PCA":
        from pyod.models.pca import PCA

        return lambda seed: PCA(), False
    raise SystemExit(f"unknown PyOD detector {name!r}: expected {', '.join(PYOD_MODELS)}")


def evaluate(maker, tasks, seeds: list[int]) -> dict[str, Any]:
    """``maker``: (detector from a seed, seeded), as the detector functions give; one
    that draws nothing runs once."""
    from sklearn.metrics import roc_auc_score

    make, seeded = maker
    runs = seeds if seeded else [None]
    # an untimed fit first: a library's first fit in a process pays one-off costs (torch
    # imports its compiler stack on the first optimizer, about 1.5 s here), which would
    # count against whichever detector happens to run first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make(runs[0]).fit(tasks[0][1])
    aucs, seconds = [], 0.0
    for seed in runs:
        for _, train, test, anomalous in tasks:
            detector = make(seed)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peers' own warnings (numba, torch) aside
                detector.fit(train)
            seconds += time.perf_counter() - start
            aucs.append(roc_auc_score(anomalous, detector.decision_function(test)))
    return {"mean_auc": float(np.mean(aucs)), "aucs": [float(a) for a in aucs],
            "fit_seconds": seconds / len(runs), "seeds": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    seeds = args.seeds
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    except ImportError:
        limits = None
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    pyod_names = list(args.pyod)
    if pyod_names:
        try:
            import pyod  # noqa: F401
        except ImportError:
            log("PyOD is not installed: aecore's rows only")
            pyod_names = []
    rows = []
    for dataset in args.datasets:
        tasks = list(one_class_tasks(dataset, args.classes))
        inputs = {"raw": tasks, "standardized": list(standardized(tasks))}
        candidates = [("aecore", n, "raw", aecore_detector(n, args)) for n in args.models]
        candidates += [("PyOD", n, given, pyod_detector(n, args))
                       for given in args.pyod_inputs for n in pyod_names]  # fmt: skip
        for library, name, given, make in candidates:
            result = evaluate(make, inputs[given], seeds)
            log(f"{dataset} {library} {name} ({given}): AUC {result['mean_auc']:.4f} "
                f"in {result['fit_seconds']:.1f} s")  # fmt: skip
            rows.append({"dataset": dataset, "library": library, "model": name,
                         "input": given, **result})  # fmt: skip
    if limits is not None:
        limits.restore_original_limits()
    print(
        f"One-class anomaly detection: mean ROC-AUC over the normal classes and seeds "
        f"{','.join(map(str, seeds))}, {args.epochs} epochs, latent {args.latent_dim}, "
        f"{args.threads} thread(s); fit s: per seed"
    )
    print_table(
        ["data", "library", "model", "input", "mean AUC", "fit s"],
        [(r["dataset"], r["library"], r["model"], r["input"], f"{r['mean_auc']:.4f}",
          f"{r['fit_seconds']:.1f}") for r in rows],
    )  # fmt: skip
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
