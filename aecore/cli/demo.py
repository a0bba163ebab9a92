"""``aecore demo``: train every registered model that has a demo recipe on bundled
data and write ``report.md`` with figures.

A plugin opts in with a class attribute ``demo = aecore.DemoRecipe(...)``; it may add
its own figures with a method ``demo_figures(prepared, out_dir) -> list[(caption, path)]``.
Sparse autoencoders (``sae-*``) have no recipe: their data are not images, and one
section of their own (``aecore.sae.demo``) covers them, run when no subset is named or
the subset names one of them.
"""

from __future__ import annotations

import time
from pathlib import Path

from aecore.cli.tables import format_ratio
from aecore.config import DemoRecipe
from aecore.errors import ConfigError

#: how much of the SAE section's budgets to spend (1: the full demo; tests shrink it)
SAE_SCALE = 1.0


def add_commands(sub) -> None:
    s = sub.add_parser("demo", help="train every variant with a demo recipe, write a report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--models", default=None, help="comma-separated subset")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    models = None
    if args.models is not None:  # "" is no model, not all of them
        models = [m.strip() for m in args.models.split(",")]
        if not all(models):
            raise ConfigError(f"--models takes comma-separated model names; got {args.models!r}")
    run(args.out, models, seed=args.seed, progress=None if not args.quiet else False)
    return 0


#: the file that marks a folder as the demo's own: a rerun replaces what is in it
DEMO_MARK = ".aecore-demo"


def _claim(out_dir: Path) -> None:
    """The demo replaces the models in its folder on each run: it refuses a folder
    holding files it did not write (a user's own models), and marks the ones it does."""
    report = out_dir / "report.md"
    ours = (out_dir / DEMO_MARK).exists() or (
        report.is_file() and report.read_text(encoding="utf-8").startswith("# aecore demo")
    )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ours:
        raise ConfigError(
            f"{out_dir} holds files the demo did not write, and the demo replaces the "
            f"models in its folder: choose another --out"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; --out names the demo's folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARK).write_text("written by aecore demo, which replaces its contents\n")


def run(
    out_dir: str | Path = "runs/demo",
    models: list[str] | None = None,
    *,
    seed: int = 0,
    progress: bool | None = None,
    log=print,
) -> Path:
    """Train the demo recipes, write figures and ``report.md`` under ``out_dir``."""
    import torch

    from aecore import plots
    from aecore.pipeline import train
    from aecore.registry import model_class, model_entries

    out_dir = Path(out_dir)
    names = models or [e.name for e in model_entries() if e.status == "ok"]
    for name in names:  # an unknown name fails before any folder or training
        model_class(name)
    _claim(out_dir)
    lines = [
        "# aecore demo",
        "",
        "Each variant trained on bundled data by its demo recipe. "
        "MSE is per element in normalised units, on the held-out test split; PCA uses "
        "the same code size and split.",
        "",
        "| model | data | code | epochs run | test MSE | PCA test MSE | ratio | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    header = len(lines)
    sections = []
    for name in names:
        cls = model_class(name)
        recipe: DemoRecipe | None = getattr(cls, "demo", None)
        if recipe is None:
            if not _built_in_sae(name):  # the SAE section below covers those
                log(f"{name}: no demo recipe, skipped")
            continue
        log(f"{name}: training on {recipe.data} for up to {recipe.train.epochs} epochs")
        start = time.perf_counter()
        model_dir = out_dir / name
        result = train(
            name,
            recipe.data,
            model_dir,
            latent_dim=recipe.latent_dim,
            hparams=recipe.hparams,
            config=recipe.train.replace(seed=seed, device="cpu"),
            normalize=recipe.normalize,
            overwrite=True,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        model, history, prepared, metrics = (
            result.model,
            result.history,
            result.prepared,
            result.metrics,
        )
        lines.append(
            f"| {name} | {recipe.data} | {recipe.latent_dim} | {len(history.epochs)} | "
            f"{metrics['test_mse']:.5f} | {metrics['pca_test_mse']:.5f} | "
            f"{format_ratio(metrics['ratio_to_pca'])} | {seconds:.1f} |"
        )
        test = prepared.view("test").to_numpy()
        with torch.no_grad():
            x = torch.as_tensor(test[:12])
            x_hat = model(x).numpy()
            z = model.encode(torch.as_tensor(test)).numpy()
        figures = [
            (
                "reconstructions (top: test inputs, bottom: reconstructions)",
                plots.reconstruction_grid(test[:12], x_hat, model_dir / "reconstructions.png"),
            ),
            ("loss curves", plots.loss_curves(history.epochs, model_dir / "loss.png", name)),
            (
                "latent map of the test split",
                plots.latent_map(z, prepared.labels("test"), model_dir / "latent.png", name),
            ),
        ]
        extra = getattr(model, "demo_figures", None)
        if extra is not None:
            figures += extra(prepared, model_dir)
        sections += [f"## {name}", ""]
        sections += [f"![{cap}]({Path(p).relative_to(out_dir)})  \n{cap}\n" for cap, p in figures]
    if len(lines) == header:  # no recipe ran (only SAEs named): no empty table
        lines = lines[:2]
    if models is None or any(_built_in_sae(name) for name in models):
        from aecore.sae.demo import sae_demo

        sections += sae_demo(out_dir, seed=seed, log=log, scale=SAE_SCALE, progress=progress)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines + [""] + sections) + "\n", encoding="utf-8")
    log(f"wrote {report}")
    return report


def _built_in_sae(name: str) -> bool:
    """One of aecore's own SAEs, which the demo's SAE section covers (a plugin's model
    named sae-* is not: it would have run that section and said nothing of its own)."""
    from aecore.registry import model_class

    return model_class(name).__module__ == "aecore_plugins.sae"
