"""Figures (matplotlib, headless): reconstruction grids, loss curves, latent maps,
filter grids. Each function writes one PNG and returns its path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_images(x: np.ndarray) -> np.ndarray | None:
    """(N, H, W) grey images from rows of shape (C,H,W), (H,W) or square (D,); None if
    the rows are not images."""
    x = np.asarray(x)
    if x.ndim == 4:
        return x.mean(axis=1) if x.shape[1] != 1 else x[:, 0]
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        side = int(round(math.sqrt(x.shape[1])))
        if side * side == x.shape[1]:
            return x.reshape(len(x), side, side)
    return None


def image_rows(rows: list[tuple[str, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """One row of images per (label, batch): e.g. corrupted / reconstructed / clean."""
    plt = _plt()
    n = max(len(batch) for _, batch in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0 + 0.4), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        images = as_images(batch)
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if images is not None and c < len(images):
                ax.imshow(images[c], cmap="gray")
        axes[r][0].set_title(label, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reconstruction_grid(
    x: np.ndarray, x_hat: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    return image_rows([("input", x), ("reconstruction", x_hat)], path, title)


def loss_curves(epochs: list[dict], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in sorted({k for e in epochs for k in e if k.endswith("_loss")}):
        points = [(e["epoch"], e[key]) for e in epochs if key in e]
        ax.plot(*zip(*points), label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def latent_map(z: np.ndarray, labels: np.ndarray | None, path: str | Path, title: str = "") -> Path:
    """Codes in 2-D (the code itself when it is 2-D, else its first two principal
    components), coloured by label."""
    plt = _plt()
    z = np.asarray(z, dtype=np.float64)
    axis_name = "z"
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        z = centred @ vt[:2].T
        axis_name = "PC"
    elif z.shape[1] == 1:
        z = np.column_stack([z[:, 0], np.zeros(len(z))])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if labels is not None:
        sc = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=6)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(z[:, 0], z[:, 1], s=6)
    ax.set_xlabel(f"{axis_name}1")
    ax.set_ylabel(f"{axis_name}2")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def latent_traversal(
    decode, start: np.ndarray, units: list[int], labels: list[str], path: str | Path
) -> Path:
    """A row of images per code unit in ``units`` (titled by ``labels``): ``decode`` (codes
    (n, k) -> images, numpy) of the code ``start`` with that unit moved from -2.5 to 2.5."""
    rows = []
    for unit, label in zip(units, labels):
        z = np.repeat(start[None].astype(np.float32), 9, axis=0)
        z[:, unit] = np.linspace(-2.5, 2.5, 9)
        rows.append((label, decode(z)))
    return image_rows(rows, path)


def filter_grid(weights: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Rows of ``weights`` (one filter each) as a grid of square images."""
    plt = _plt()
    images = as_images(np.asarray(weights))
    if images is None:
        raise ValueError(f"filters of shape {np.shape(weights)} are not square images")
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6 + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
