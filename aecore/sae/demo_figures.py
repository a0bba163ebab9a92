"""Figures of the sparse-autoencoder demo (matplotlib, headless): how often each latent
fires, how well a dictionary matches known features, and the contexts that make
latents fire (found by ``top_contexts``, also written as a markdown table). Each
figure function writes one PNG and returns its path."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from aecore.plots import _plt

#: one example's text around the token: (before, the token, after)
Context = tuple[str, str, str]


def density_histogram(
    density: np.ndarray, path: str | Path, title: str, *, reference: float | None = None
) -> Path:
    """Histogram of log10 firing frequency of the latents that fired at all; the dead
    ones (log10 0 is -inf) are counted in the legend. ``reference``: a frequency to
    mark, e.g. the true features' firing probability."""
    plt = _plt()
    density = np.asarray(density, dtype=np.float64)
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if len(alive):
        ax.hist(np.log10(alive), bins=40, color="tab:blue", alpha=0.85, label="latents")
    if reference is not None:
        ax.axvline(np.log10(reference), color="tab:red", ls="--", lw=1.2, label="true features")
    dead = len(density) - len(alive)
    ax.plot([], [], " ", label=f"dead: {dead} of {len(density)}")  # a legend-only entry
    ax.set_xlabel("log10 firing frequency on held-out rows")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def max_cosine_histogram(best: np.ndarray, path: str | Path, title: str) -> Path:
    """Histogram of each true feature's largest cosine similarity with any learned
    dictionary direction (1: recovered exactly)."""
    plt = _plt()
    best = np.asarray(best, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    low = min(0.0, float(best.min(initial=0.0)))  # cosines are signed: room below 0
    ax.hist(best, bins=np.linspace(low, 1.0, 41), color="tab:green", alpha=0.85)
    ax.axvline(best.mean(), color="black", ls="--", lw=1.0, label=f"mean (MMCS) {best.mean():.3f}")
    ax.set_yscale("log")  # mostly near 1: the few misses stay visible
    ax.set_xlabel("best cosine similarity of each true feature with the dictionary")
    ax.set_ylabel("true features")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return _save(fig, path)


def top_examples(
    latents: list[tuple[int, float, list[tuple[float, Context]]]],
    path: str | Path,
    title: str,
) -> Path:
    """The top-activating contexts of some latents as text: per latent a heading
    (index, firing frequency) and one line per example, its activation, then the
    context with the token that fired highlighted. ``latents``: (latent, density,
    [(activation, (before, token, after)), ...])."""
    plt = _plt()
    lines = sum(1 + len(examples) for _, _, examples in latents)
    height = 0.6 + 0.2 * lines
    fig = plt.figure(figsize=(5.0, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    step = 0.2 / height
    y = 1 - 0.5 / height
    # contexts cut short by the start of the text are padded: the tokens line up
    width = max((len(c[0]) for _, _, ex in latents for _, c in ex), default=0)
    mono = {"family": "monospace", "size": 8, "parse_math": False}  # text may hold "$"
    for latent, density, examples in latents:
        ax.text(0.02, y, f"latent {latent}  (fires on {100 * density:.3g}% of held-out tokens)",
                weight="bold", size=8, va="baseline", parse_math=False)  # fmt: skip
        y -= step
        for value, (before, token, after) in examples:
            # three pieces chained end to end, so the highlight sits on the token
            # whatever the font's widths
            first = ax.text(0.04, y, f"{value:7.2f}   {before:>{width}}", va="baseline", **mono)
            mark = ax.annotate(
                token, xy=(1, 0), xycoords=first, va="bottom", **mono,
                bbox={"boxstyle": "square,pad=0.05", "fc": "gold", "ec": "none"},
            )  # fmt: skip
            ax.annotate(after, xy=(1, 0), xycoords=mark, va="bottom", **mono)
            y -= step
    return _save(fig, path)


def top_contexts(
    codes: Iterable[tuple[int, torch.Tensor]],
    positions: np.ndarray,
    text: str,
    count: int,
    *,
    before: int = 28,
    after: int = 8,
) -> dict[int, list[tuple[float, Context]]]:
    """Per latent that fired, its ``count`` largest activations on distinct positions
    of ``text``, largest first, each with its context. ``codes``: (first row, dense
    codes (B, latents)) batches; ``positions[row]``: where in ``text`` that row's token
    sits (overlapping windows give a character several rows: it is shown once)."""
    best_v = best_i = None
    for start, z in codes:
        z = z.T.masked_fill(z.T == 0, -math.inf)  # (latents, B): never-fired is no example
        rows = torch.arange(start, start + z.shape[1]).expand_as(z)
        if best_v is not None:
            z, rows = torch.cat([best_v, z], 1), torch.cat([best_i, rows], 1)
        best_v, order = z.topk(min(8 * count, z.shape[1]), dim=1)  # room for repeats
        best_i = rows.gather(1, order)
    found: dict[int, list[tuple[float, Context]]] = {}
    for latent, (values, rows) in enumerate(zip(best_v.tolist(), best_i.tolist())):
        seen: dict[int, float] = {}
        for value, row in zip(values, rows):
            if value == -math.inf or len(seen) == count:
                break
            seen.setdefault(int(positions[row]), value)
        if seen:
            found[latent] = [(v, _context(text, p, before, after)) for p, v in seen.items()]
    return found


def _context(text: str, pos: int, before: int, after: int) -> Context:
    def show(s: str) -> str:
        return s.replace("\n", "¶")  # one character for one: the highlight stays put

    return (
        show(text[max(0, pos - before) : pos]),
        show(text[pos]),
        show(text[pos + 1 : pos + 1 + after]),
    )


def examples_table(latents: list[tuple[int, float, list[tuple[float, Context]]]]) -> list[str]:
    """``top_examples``' latents as markdown table lines: the token in brackets."""

    def cell(before: str, token: str, after: str) -> str:
        # a code span keeps markup literal; "|" still needs escaping inside a table
        return "`" + f"{before}[{token}]{after}".replace("`", "'").replace("|", "\\|") + "`"

    lines = ["| latent | fires on | top contexts |", "| --- | --- | --- |"]
    for latent, density, examples in latents:
        shown = "<br>".join(f"{value:.2f} {cell(*context)}" for value, context in examples)
        lines.append(f"| {latent} | {100 * density:.3g}% | {shown} |")
    return [*lines, ""]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path
