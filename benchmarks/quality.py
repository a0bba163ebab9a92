"""``aecore bench quality``: every model's test reconstruction error against PCA with the
same code size, from one run, as a user meets it.

Defaults: each model that starts from PCA (capability ``pca-start``) at each code size
and data set, through each entry point with nothing set: ``Trainer()`` on a seeded 80/20
split of the data scaled to [0, 1] (no validation data), ``aecore train`` without flags
(its 70/10/20 split, min-max scaling, early stopping) and the scikit-learn estimator
(vector models; standardised). PCA is fitted on the same training rows, in the same
units. A denoising model is judged on what it is for: its output for corrupted test
inputs against the clean ones, beside PCA's projection of the same corrupted inputs.

Recipes: the README's quality recipes through ``aecore train`` on several seeds of its
split and on its stratified split.

Prints one table per section and writes JSON. Training runs one thread per process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from aecore_benchmarks.args import counts, json_file, names, natural, naturals, write_json

#: data set -> (source for vector models, source for image-only models)
DATASETS = {"digits": ("digits", "digits:image"), "colour": ("colour_patches", "colour_patches")}
CODES = (2, 8, 30)
ENTRIES = ("trainer", "cli", "sklearn")

#: the README's recipes: (model, code, hparams, settings of aecore train)
DEEP = {"epochs": 250, "lr": 1e-3, "val_fraction": 0.0}
RECIPES: list[tuple[str, int, dict, dict]] = [
    ("ae", 8, {}, {"epochs": 200}),
    ("ae", 30, {}, {"epochs": 200}),
    ("deep", 2, {"start": "pretrained"}, DEEP),
    ("deep", 8, {"start": "pretrained"}, DEEP),
    ("deep", 30, {}, DEEP),
    ("conv", 8, {}, {"epochs": 120, "lr": 2e-3}),
    ("denoising", 16, {"corruption": "masking", "p": 0.3}, {"epochs": 150}),
    ("vae", 8, {}, {"epochs": 500, "batch_size": 128, "lr": 1e-3}),
]


def _pca(train: np.ndarray, k: int):
    from aecore.layers import pca_basis

    mean, comps = pca_basis(torch.from_numpy(train.reshape(len(train), -1)), k)
    mean, comps = mean.numpy(), comps.numpy()

    def project(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1).astype(np.float64)
        return ((flat - mean) @ comps.T @ comps + mean).reshape(x.shape)

    return project


def _mse(a, b) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _scores(model, project, x_test: np.ndarray, seed: int) -> dict[str, float]:
    """Test MSE of the model and of PCA (``project``) on normalised inputs; for a model
    that corrupts its inputs (``corrupt``), on corrupted inputs against the clean ones."""
    from aecore.base import eval_mode

    x = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32))
    with torch.no_grad(), eval_mode(model):
        out = {"mse": _mse(model(x), x), "pca_mse": _mse(project(x_test), x_test)}
        corrupt = getattr(model, "corrupt", None)
        if corrupt is not None:
            noisy = corrupt(x, torch.Generator().manual_seed(seed))
            out["mse"] = _mse(model(noisy), x)  # judged on denoising
            out["pca_mse"] = _mse(project(noisy.numpy()), x_test)
            out["clean_mse"] = _mse(model(x), x)
    out["ratio"] = out["mse"] / out["pca_mse"]
    return out


def entry_trainer(
    name: str, source: str, code: int, seed: int, hparams: dict | None = None, **settings
) -> dict:
    """``Trainer()`` as it comes (``settings`` on top) on a seeded 80/20 split scaled to
    [0, 1]; ``hparams`` for the model."""
    import aecore
    from aecore.data import Normalization, load_data

    data = load_data(source)
    order = np.random.default_rng(seed + 1000).permutation(len(data))
    cut = int(0.8 * len(data))
    raw_train, raw_test = data.x[np.sort(order[:cut])], data.x[np.sort(order[cut:])]
    norm = Normalization.fit("minmax", raw_train)
    train, test = norm.apply(raw_train), norm.apply(raw_test)
    torch.manual_seed(seed)
    model = aecore.create(name, input_shape=data.shape, latent_dim=code, **(hparams or {}))
    aecore.Trainer(seed=seed, device="cpu", progress=False, **settings).fit(model, train)
    return _scores(model, _pca(train, code), test, seed)


def entry_cli(
    name: str,
    source: str,
    code: int,
    seed: int,
    hparams: dict | None = None,
    split: str = "random",
    **settings,
) -> dict:
    """``aecore train`` without flags but the seed (``settings`` and ``--set hparams``
    on top for a recipe)."""
    from aecore.pipeline import train

    result = train(name, source, None, latent_dim=code, hparams=hparams or {}, split=split,
                   seed=seed, device="cpu", progress=False, **settings)  # fmt: skip
    project = _pca(result.prepared.view("train").to_numpy(), code)  # the model's rows
    out = _scores(result.model, project, result.prepared.view("test").to_numpy(), seed)
    out.update({k: v for k, v in result.metrics.items() if k.startswith("test_log")})
    out["epochs_run"] = len(result.history.epochs)
    return out


def entry_sklearn(
    name: str, source: str, code: int, seed: int, hparams: dict | None = None, **settings
) -> dict:
    """``AutoencoderTransformer(name, latent_dim=code)`` (``settings`` and ``hparams`` as
    its parameters) on the raw 80/20 split."""
    from aecore.data import load_data
    from aecore.sklearn import AutoencoderTransformer

    data = load_data(source)
    x = data.x.reshape(len(data), -1).astype(np.float64)
    order = np.random.default_rng(seed + 1000).permutation(len(x))
    cut = int(0.8 * len(x))
    x_train, x_test = x[np.sort(order[:cut])], x[np.sort(order[cut:])]
    est = AutoencoderTransformer(
        name, latent_dim=code, random_state=seed, **settings, **(hparams or {})
    )
    est.fit(x_train)
    norm = est.normalization_
    train, test = norm.apply(x_train), norm.apply(x_test)
    return _scores(est.model_, _pca(train, code), test, seed)


def run_defaults(models, datasets, codes, entries, seed: int, log) -> list[dict]:
    import aecore

    rows = []
    for dataset in datasets:
        for name in models:
            caps = aecore.capabilities(aecore.model_class(name))
            source = DATASETS[dataset][0 if "vector" in caps else 1]
            for entry in entries:
                if entry == "sklearn" and "vector" not in caps:
                    continue
                for code in codes:
                    start = time.perf_counter()
                    result = globals()[f"entry_{entry}"](name, source, code, seed)
                    row = {"dataset": dataset, "model": name, "entry": entry, "code": code,
                           "seed": seed, **result, "seconds": time.perf_counter() - start}  # fmt: skip
                    log(f"{dataset} {name} {entry} code {code}: {row['ratio']:.3f} x PCA")
                    rows.append(row)
    return rows


def run_recipes(seeds, log, only: set[str] | None = None) -> list[dict]:
    """Each recipe on every seed of the random split and the first of the stratified."""
    rows = []
    runs = [("random", s) for s in seeds] + [("stratified", seeds[0])]
    for name, code, hparams, settings in RECIPES:
        if only and name not in only:
            continue
        source = "digits:image" if name == "conv" else "digits"
        for split, seed in runs:
            start = time.perf_counter()
            result = entry_cli(
                name, source, code, seed, hparams=dict(hparams), split=split, **settings
            )
            row = {"model": name, "code": code, "split": split, "seed": seed, **result,
                   "seconds": time.perf_counter() - start}  # fmt: skip
            log(f"recipe {name} code {code} {split} seed {seed}: {row['ratio']:.3f} x PCA")
            rows.append(row)
    return rows


def print_report(report: dict[str, Any]) -> None:
    from aecore.cli.tables import print_table

    if report["defaults"]:
        print("defaults: test MSE / PCA's at the same code size (denoising: on corrupted inputs)")
        rows = [
            (r["dataset"], r["model"], r["entry"], r["code"])
            + (f"{r['mse']:.5f}", f"{r['pca_mse']:.5f}", f"{r['ratio']:.3f}")
            for r in report["defaults"]
        ]
        print_table(["data", "model", "entry point", "code", "MSE", "PCA MSE", "ratio"], rows)
    if report["recipes"]:
        print("\nrecipes (aecore train, digits): test MSE / PCA's per split and seed")
        groups: dict[tuple, list[dict]] = {}
        for r in report["recipes"]:
            groups.setdefault((r["model"], r["code"]), []).append(r)
        runs = list(dict.fromkeys((r["split"], r["seed"]) for r in report["recipes"]))
        with_ll = any("test_log_likelihood_k1000" in r for r in report["recipes"])
        rows = []
        for (name, code), group in groups.items():
            by_run = {(r["split"], r["seed"]): r for r in group}
            cells = [f"{by_run[k]['ratio']:.3f}" if k in by_run else "" for k in runs]
            row = [name, code, *cells, f"{statistics.median(r['ratio'] for r in group):.3f}"]
            if with_ll:
                lls = [
                    r["test_log_likelihood_k1000"]
                    for r in group
                    if "test_log_likelihood_k1000" in r
                ]
                row.append(" ".join(f"{v:.2f}" for v in lls))
            rows.append(tuple(row))
        headers = ["model", "code", *(f"{split} {seed}" for split, seed in runs), "median"]
        print_table(headers + (["log p(x), nats"] if with_ll else []), rows)


def main(argv: list[str] | None = None) -> int:
    import aecore

    p = argparse.ArgumentParser(prog="aecore bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated (default: pca-start models)")
    p.add_argument("--datasets", type=names(DATASETS), default=list(DATASETS))
    p.add_argument("--codes", type=counts, default=list(CODES), help="'' skips the defaults")
    p.add_argument("--entries", type=names(ENTRIES), default=list(ENTRIES))
    p.add_argument("--seed", type=natural, default=0, help="seed of the defaults section")
    recipe_models = sorted({recipe[0] for recipe in RECIPES})
    p.add_argument(
        "--recipes",
        type=names(["all", "none", *recipe_models]),
        default=["all"],
        help=f"'all', 'none' or some of {', '.join(recipe_models)}",
    )
    p.add_argument("--recipe-seeds", type=naturals, default=[0, 1, 2])
    p.add_argument("--json", type=json_file, default=None, metavar="FILE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else aecore.list_models(requires="pca-start")
    for name in models:
        aecore.model_class(name)  # an unknown name fails before any training
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {"defaults": [], "recipes": []}
    if len(args.recipes) > 1 and {"all", "none"} & set(args.recipes):
        p.error("--recipes: 'all' and 'none' stand alone")
    if args.codes and args.entries and args.datasets:
        report["defaults"] = run_defaults(
            models, args.datasets, args.codes, args.entries, args.seed, log
        )
    if args.recipes and args.recipes != ["none"]:
        only = None if args.recipes == ["all"] else set(args.recipes)
        report["recipes"] = run_recipes(args.recipe_seeds, log, only)
    print_report(report)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
