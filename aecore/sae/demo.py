"""The sparse-autoencoder section of ``aecore demo``: ``sae-topk`` trained on

1. a synthetic superposition whose true features are known, scored by how well the
   dictionary and the codes recover them (MMCS, MCC);
2. the residual stream of a tiny character-level transformer trained here on text that
   ships with installed packages (scikit-learn's data set descriptions, else the
   standard library's docstrings: nothing is downloaded), scored by the language
   model's loss with the reconstruction spliced in, with the contexts that make a
   spread of latents fire.

``sae_demo`` writes its figures and models under ``out_dir/sae/`` and returns the
report's markdown lines; ``scale`` shrinks every budget (rows, steps) so that a test
runs the whole section in seconds.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aecore.config import TrainConfig
from aecore.errors import ConfigError
from aecore.sae import demo_figures

#: the synthetic source at scale 1 (``spread``: directions pushed apart a little, so
#: fewer near-duplicate features blur the comparison with the truth)
SYNTHETIC = "d=64,n=512,p=0.01,std=0.5,spread=50"
SYNTHETIC_ROWS = 400_000
LATENTS, K = 512, 8
#: SAE batch: at this size 256 rows a step learn about as much per row as 128 in half
#: the steps, where 1024 learn much less
SAE_BATCH = 256
#: the held-out rows the metrics and histograms read at most
EVAL_ROWS = 50_000

# the tiny transformer: 2 blocks of width 64 over characters
SEQ, LM_STEPS, LM_BATCH, LM_LR = 64, 800, 32, 3e-3
HOOK = "transformer.h.0"  # the residual stream after the first block
#: windows of the training text start this far apart: each character is seen in
#: several contexts, so the SAE gets more (and more varied) rows than the text has
WINDOW_STRIDE = 16
LM_LATENTS, LM_K = 256, 8
TOP_LATENTS, TOP_EXAMPLES = 6, 5

Log = Callable[[str], None]


def sae_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    log: Log = print,
    scale: float = 1.0,
    progress: bool | None = False,
) -> list[str]:
    """Run both parts, write figures under ``out_dir/sae/`` and return the markdown
    lines of the report section (links relative to ``out_dir``)."""
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1e3):
        raise ConfigError(f"scale must be a number in (0, 1000]; got {scale!r}")
    out_dir = Path(out_dir)
    (out_dir / "sae").mkdir(parents=True, exist_ok=True)
    lines = [
        "## Sparse autoencoders",
        "",
        f"`sae-topk` with its default recipe, trained one pass over the rows (batch "
        f"{SAE_BATCH}); metrics on held-out rows. EV: explained variance; L0: active "
        f"latents per row; dead: latents that never fire on the held-out rows.",
        "",
    ]
    lines += _synthetic(out_dir, seed, log, scale, progress)
    lines += _transformer(out_dir, seed, log, scale, progress)
    return lines


def _budget(value: int, scale: float, low: int) -> int:
    return max(low, round(value * scale))


def _train(source: str, out: Path, latents: int, k: int, seed: int, progress):
    from aecore.pipeline import train

    config = TrainConfig(epochs=1, batch_size=SAE_BATCH, val_fraction=0.0, seed=seed, device="cpu")
    return train("sae-topk", source, out, latent_dim=latents, hparams={"k": k}, config=config,
                 normalize="auto", overwrite=True, progress=progress)  # fmt: skip


def _held_out(prepared):
    """At most ``EVAL_ROWS`` test rows, evenly spread (the first ones of a cache would
    all come from the start of the text), as a view that knows their positions."""
    from aecore.data import ArrayView

    rows = prepared.split.test
    if len(rows) > EVAL_ROWS:
        rows = rows[np.linspace(0, len(rows) - 1, EVAL_ROWS).round().astype(np.int64)]
    return ArrayView(prepared.dataset.x, rows, prepared.normalization)


@torch.no_grad()
def _codes(model, view, batch: int = 4096):
    """Dense codes of ``view``'s rows, batch by batch."""
    model.eval()
    for start in range(0, len(view), batch):
        yield start, model.encode(torch.as_tensor(view[slice(start, start + batch)]))


def _density(model, view) -> np.ndarray:
    """Each latent's firing frequency over ``view``'s rows."""
    fired = torch.zeros(model.latent_dim, dtype=torch.int64)
    for _, z in _codes(model, view):
        fired += (z != 0).sum(0)
    return (fired.double() / max(len(view), 1)).numpy()


def _table(row: dict[str, str]) -> list[str]:
    """A markdown table of one row: the keys head the columns."""
    return ["| " + " | ".join(row) + " |", "|" + " --- |" * len(row),
            "| " + " | ".join(row.values()) + " |", ""]  # fmt: skip


def _figure(out_dir: Path, caption: str, path: Path) -> str:
    return f"![{caption}]({path.relative_to(out_dir).as_posix()})  \n{caption}\n"


# -- 1. synthetic superposition -------------------------------------------------------
def _synthetic(out_dir: Path, seed: int, log: Log, scale: float, progress) -> list[str]:
    from aecore.data.superposition import superposition_from_source
    from aecore.sae.metrics import max_cosine_similarity, sae_metrics

    folder = out_dir / "sae"
    rows = _budget(SYNTHETIC_ROWS, scale, 2000)
    source = f"superposition:{rows},{SYNTHETIC},seed={seed}"
    truth = superposition_from_source(source)
    log(f"sae-topk: training on {source} ({LATENTS} latents, k={K})")
    start = time.perf_counter()
    result = _train(source, folder / "synthetic-model", LATENTS, K, seed, progress)
    seconds = time.perf_counter() - start
    model, view = result.model, _held_out(result.prepared)
    m = sae_metrics(model, view, truth=truth)
    density = _density(model, view)
    best = max_cosine_similarity(truth.features(), model.dictionary()).numpy()
    log(f"sae-topk synthetic: EV {m['explained_variance']:.3f}, L0 {m['l0']:.2f}, dead "
        f"{m['dead']}, MMCS {m['mmcs']:.3f}, MCC {m['mcc']:.3f} ({seconds:.1f} s)")  # fmt: skip
    p = float(truth.probabilities().mean())
    figures = {
        "latent firing frequencies (dashed line: true p)": demo_figures.density_histogram(
            density, folder / "synthetic_density.png", "sae-topk on superposition", reference=p
        ),
        "each true feature's best cosine with the dictionary": demo_figures.max_cosine_histogram(
            best, folder / "synthetic_max_cosine.png", "true features vs. dictionary"
        ),
    }
    found = float((best > 0.9).mean())
    row = {
        "EV": f"{m['explained_variance']:.3f}",
        "L0": f"{m['l0']:.2f}",
        "dead": f"{m['dead']} / {LATENTS}",
        "MMCS": f"{m['mmcs']:.3f}",
        "MCC": f"{m['mcc']:.3f}",
        "shrinkage": f"{m['shrinkage']:.3f}",
        "seconds": f"{seconds:.1f}",
    }
    return [
        "### Synthetic superposition with known features",
        "",
        f"`{source}`: {truth.n_features} unit directions in {truth.d} dimensions, each "
        f"firing with probability {p:g} (about {truth.n_features * p:.1f} per row). "
        f"{LATENTS} latents, k = {K}, {len(result.prepared.split.train)} training rows, metrics on "
        f"{len(view)} held-out rows. MMCS: each true direction's best cosine with the "
        f"dictionary, averaged; MCC: mean correlation of codes with the true activations "
        f"under the best one-to-one matching. {100 * found:.0f}% of the true features "
        f"have a dictionary direction within cosine 0.9.",
        "",
        *_table(row),
        *(_figure(out_dir, caption, path) for caption, path in figures.items()),
    ]


# -- 2. a tiny transformer's residual stream --------------------------------------------
def corpus() -> tuple[str, str]:
    """(what it is, text): text that ships with installed packages, as printable ASCII
    plus line breaks: scikit-learn's data set descriptions, else the docstrings of a
    few standard library modules."""
    import importlib
    import inspect
    from importlib import resources

    try:
        folder = resources.files("sklearn.datasets") / "descr"
        parts = sorted((f.name, f.read_text(encoding="utf-8")) for f in folder.iterdir()
                       if f.name.endswith(".rst"))  # fmt: skip
        name, text = "scikit-learn's data set descriptions", "\n".join(p for _, p in parts)
    except (ImportError, OSError):
        name, text = "", ""
    if len(text) < 10_000:  # no scikit-learn: documentation every Python has
        name, docs = "standard library docstrings", []
        for module in ("argparse", "difflib", "json", "re", "subprocess", "textwrap"):
            found = importlib.import_module(module)
            public = sorted((k, v) for k, v in vars(found).items() if k[0] != "_")
            mine = [v for _, v in public if getattr(v, "__module__", "") == module]
            docs += [found.__doc__, *map(inspect.getdoc, mine)]
        text = "\n\n".join(doc for doc in docs if doc)
    text = text.replace("\t", "    ")
    return name, "".join(c if " " <= c <= "~" or c == "\n" else "?" for c in text)


def _tiny_lm(vocab: int, train_ids: np.ndarray, steps: int, seed: int):
    """A 2-block GPT-2 over characters, trained ``steps`` Adam steps on random windows."""
    import transformers
    from torch.nn import functional as F

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    lm = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=LM_LR, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    lm.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - SEQ, LM_BATCH)
        batch = torch.as_tensor(np.stack([train_ids[s : s + SEQ] for s in starts]))
        logits = lm(batch).logits[:, :-1]
        # the loss by hand: transformers' own (labels=) logs about the config's loss_type
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        # the learning rate falls linearly to a tenth: a short run still settles
        for group in optimizer.param_groups:
            group["lr"] = LM_LR * (1 - 0.9 * step / max(steps, 1))
        optimizer.step()
    return lm.eval()


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' saving and loading draw progress bars on stderr: off meanwhile."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _transformer(out_dir: Path, seed: int, log: Log, scale: float, progress) -> list[str]:
    head = ["### A tiny transformer's residual stream", ""]
    try:
        import transformers  # noqa: F401
    except ImportError:
        log("sae demo: transformers is not installed; the transformer part is skipped")
        return [*head, "Skipped: `transformers` is not installed.", ""]
    from aecore.activations import ce_loss_recovered, extract_activations
    from aecore.sae.metrics import sae_metrics

    folder = out_dir / "sae"
    corpus_name, text = corpus()
    if len(text) < 20 * SEQ:  # docstrings stripped (python -OO) and no scikit-learn
        log("sae demo: no text to train a language model on; the transformer part is skipped")
        return [*head, "Skipped: no text found to train a language model on.", ""]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(ids))  # the last tenth is held out from both models
    steps = _budget(LM_STEPS, scale, 5)
    log(f"tiny LM: {len(text)} characters of {corpus_name}, {steps} steps")
    start = time.perf_counter()
    lm = _tiny_lm(len(vocab), ids[:split], steps, seed)
    lm_seconds = time.perf_counter() - start
    with _no_progress_bars():
        lm.save_pretrained(folder / "tiny-lm")
    (folder / "tiny-lm" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")

    windows = np.arange(0, split - SEQ + 1, WINDOW_STRIDE)
    windows = windows[: _budget(len(windows), scale, 16)]
    np.save(folder / "tokens.npy", np.stack([ids[s : s + SEQ] for s in windows]))
    cache = folder / "activations"
    with _no_progress_bars():  # extraction loads the saved folder, as a user would
        extract_activations(str(folder / "tiny-lm"), f"npy:{folder / 'tokens.npy'}", [HOOK],
                            cache, batch_size=64, overwrite=True)  # fmt: skip
    log(f"sae-topk: training on {len(windows) * SEQ} activations of {HOOK}")
    start = time.perf_counter()
    result = _train(f"activations:{cache}:{HOOK}", folder / "lm-model", LM_LATENTS, LM_K,
                    seed, progress)  # fmt: skip
    seconds = time.perf_counter() - start
    model, view = result.model, _held_out(result.prepared)
    m = sae_metrics(model, view)
    density = _density(model, view)

    held = ids[split:]
    held = np.stack([held[s : s + SEQ] for s in range(0, len(held) - SEQ + 1, SEQ)])
    held = held[: _budget(len(held), scale, 4)]

    def reconstruct(acts: torch.Tensor) -> torch.Tensor:
        return model(acts.reshape(-1, acts.shape[-1])).reshape(acts.shape)

    ce = ce_loss_recovered(lm, HOOK, reconstruct, held, batch_size=32)
    log(f"sae-topk on {HOOK}: EV {m['explained_variance']:.3f}, L0 {m['l0']:.2f}, dead "
        f"{m['dead_fraction']:.3f}, CE loss recovered {ce['ce_loss_recovered']:.3f} "
        f"(clean {ce['ce_clean']:.3f}, spliced {ce['ce_spliced']:.3f}, "
        f"zero {ce['ce_zero']:.3f}; {seconds:.1f} s)")  # fmt: skip

    # a held-out row's text position: its window's start plus its offset in the window
    positions = windows[view.indices // SEQ] + view.indices % SEQ
    found = demo_figures.top_contexts(_codes(model, view), positions, text, TOP_EXAMPLES)
    # a spread of the latents that fired, from the most to the least frequent; those
    # with a full set of examples, where there are any
    full = [latent for latent, examples in found.items() if len(examples) == TOP_EXAMPLES]
    alive = sorted(full or found, key=lambda latent: -density[latent])
    spread = np.unique(np.linspace(0, len(alive) - 1, TOP_LATENTS).round().astype(int))
    chosen = (
        [(alive[i], float(density[alive[i]]), found[alive[i]]) for i in spread] if alive else []
    )
    title = f"sae-topk on {HOOK}"
    figures = {
        "latent firing frequencies": demo_figures.density_histogram(
            density, folder / "lm_density.png", title
        ),
        "top-activating contexts of a spread of latents": demo_figures.top_examples(
            chosen, folder / "lm_top_examples.png", f"{title}: top contexts"
        ),
    }
    row = {
        "EV": f"{m['explained_variance']:.3f}",
        "L0": f"{m['l0']:.2f}",
        "dead fraction": f"{m['dead_fraction']:.3f}",
        "CE clean": f"{ce['ce_clean']:.3f}",
        "CE spliced": f"{ce['ce_spliced']:.3f}",
        "CE zero-ablated": f"{ce['ce_zero']:.3f}",
        "CE loss recovered": f"{ce['ce_loss_recovered']:.3f}",
        "seconds": f"{seconds:.1f}",
    }
    return [
        *head,
        f"A GPT-2 with 2 blocks of width 64 over {len(vocab)} characters, trained {steps} "
        f"steps ({lm_seconds:.1f} s) on {split} characters of {corpus_name} (saved in "
        f"`sae/tiny-lm`). `sae-topk` ({LM_LATENTS} latents, k = {LM_K}) learns the output "
        f"of `{HOOK}` (the residual stream after the first block) over {len(windows)} "
        f"windows of {SEQ} characters ({len(result.prepared.split.train)} training rows); "
        f"metrics on {len(view)} held-out rows. CE: the next-character loss (nats) on "
        f"{held.size} held-out characters, clean, with the block's output replaced by the "
        f"SAE's reconstruction, and zeroed; CE loss recovered = (zero - spliced) / "
        f"(zero - clean).",
        "",
        *_table(row),
        *(_figure(out_dir, caption, path) for caption, path in figures.items()),
        "Top-activating contexts (activation, then the text with the token in brackets; "
        "¶ is a line break):",
        "",
        *demo_figures.examples_table(chosen),
    ]
