"""Named data sources: ``load_data(source)`` turns a name such as ``digits`` or
``npy:PATH`` into a ``Dataset`` of rows.

* ``digits`` / ``digits:image``: scikit-learn's bundled 8x8 digits as (N, 64) / (N, 1, 8, 8)
* ``npy:PATH``: memory-mapped, so data larger than RAM streams from disk
* ``npz:PATH[:KEY]``: memory-mapped when the archive is uncompressed (``np.savez``)
* ``csv:PATH[:header|:noheader]``: numeric CSV, an optional header row (guessed, or
  ``:header``: the first row is one, numbers too; ``:noheader``: it is data)
* ``idx:PATH[:LABELS]``: MNIST / Fashion-MNIST IDX files, gzipped or not
* ``patches[:N]``: 8x8 patches of scikit-learn's sample images (Ng's sparse-coding exercise)
* ``colour_patches[:N]``: 8x8 colour patches of the same images, (N, 3, 8, 8) pixels 0..255
* ``activations:DIR[:HOOK]``: one hook of an activation cache (``aecore activations
  extract``), read shard by shard on demand; HOOK may be left out when it holds one
* ``superposition[:ROWS][,KEY=VALUE...]``: sparse non-negative combinations of more
  feature directions than dimensions, with known ground truth (``data/superposition.py``;
  keys d, n, p, std, noise, seed, spread; e.g. ``superposition:100000,d=64,n=512,p=0.02``)

Normalisation is not applied here: it is fitted on the training rows only
(``aecore.data.prepare``) and applied lazily, batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aecore.activations.cache import ActivationCache
from aecore.data.dataset import Dataset, as_dataset
from aecore.data.files import csv_header, csv_source, read_csv, read_idx_images, read_npy, read_npz
from aecore.data.images import sample_colour_patches, sample_patches
from aecore.data.superposition import SOURCE_FORM, superposition_rows
from aecore.errors import DataError
from aecore.keywords import checked_keywords

SourceResult = tuple[np.ndarray, "np.ndarray | None"]


def _digits(rest: str) -> SourceResult:
    from sklearn.datasets import load_digits

    if rest not in ("", "image", "vector"):
        raise DataError(f"digits: expected 'digits' or 'digits:image'; got 'digits:{rest}'")
    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    if rest == "image":
        x = x.reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def _count(kind: str, rest: str, default: int) -> int:
    """The COUNT of ``kind[:COUNT]``."""
    if not rest:
        return default
    try:
        n = int(rest)
    except ValueError:
        raise DataError(f"{kind}: expected {kind}[:COUNT]; got '{kind}:{rest}'") from None
    if n < 1:
        raise DataError(f"{kind}: COUNT must be positive; got {n}")
    return n


def _activations(rest: str) -> SourceResult:
    """``DIR[:HOOK]``: hook names hold dots but no colons, so the last colon that does
    not belong to an existing folder starts the hook."""
    if not rest:
        raise DataError("activations: expected activations:DIR[:HOOK]; got 'activations:'")
    folder, colon, hook = rest.rpartition(":")
    if not colon or Path(rest).is_dir():  # no hook named
        return ActivationCache(Path(rest).expanduser(), None), None
    # DIR: (an empty name) is the model's output, the hook ''
    return ActivationCache(Path(folder).expanduser(), hook), None


#: source kind -> (its forms, for help and errors; the loader of the text after
#: ``kind:``, returning rows and labels or None)
SOURCES: dict[str, tuple[str, Callable[[str], SourceResult]]] = {
    "digits": ("digits, digits:image", _digits),
    "npy": ("npy:PATH", lambda rest: (read_npy(rest), None)),
    "npz": ("npz:PATH[:KEY]", lambda rest: (read_npz(rest), None)),
    "csv": ("csv:PATH[:header|:noheader]", lambda rest: (_csv(rest), None)),
    "idx": ("idx:PATH[:LABELS]", read_idx_images),
    "patches": ("patches", lambda rest: (sample_patches(_count("patches", rest, 10000)), None)),
    "colour_patches": (
        "colour_patches",
        lambda rest: (sample_colour_patches(_count("colour_patches", rest, 5000)), None),
    ),
    "superposition": (SOURCE_FORM, lambda rest: (superposition_rows(rest), None)),
    "activations": ("activations:DIR[:HOOK]", _activations),
}
SOURCE_FORMS = ", ".join(forms for forms, _ in SOURCES.values())


def source_columns(source: str) -> list[str] | None:
    """The column names a source gives (a CSV's header row), or None."""
    kind, _, rest = source.partition(":")
    if kind != "csv" or not rest:
        return None
    path, header = csv_source(rest)
    return csv_header(Path(path).expanduser(), header=header)


def _csv(rest: str) -> np.ndarray:
    path, header = csv_source(rest)
    return read_csv(path, header=header)


@checked_keywords
def load_data(source: str, *, check_finite: bool = True) -> Dataset:
    """Load a named data source (see the module docstring)."""
    if not isinstance(source, str) or not source:
        got = repr(source) if isinstance(source, str) else f"a {type(source).__name__}"
        if hasattr(source, "shape"):  # an array: named by its shape, not printed whole
            got += f" of shape {tuple(source.shape)} (save it, np.save, and pass 'npy:PATH')"
        raise DataError(f"data source must be a non-empty string such as 'digits'; got {got}")
    kind, colon, rest = source.partition(":")
    if kind not in SOURCES:
        raise DataError(f"unknown data source {source!r}: expected one of {SOURCE_FORMS}")
    if colon and not rest:
        raise DataError(f"data source {source!r}: nothing after ':' (forms: {SOURCES[kind][0]})")
    x, labels = SOURCES[kind][1](rest)
    return as_dataset(x, labels, source, check_finite=check_finite)
