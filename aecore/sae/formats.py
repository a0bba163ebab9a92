"""Sparse autoencoders in other libraries' folder formats, both ways: SAELens
(``save_saelens`` / ``load_saelens``) and EleutherAI sparsify (``save_sparsify`` /
``load_sparsify``), with ``detect_format`` telling the two apart by their files.

Exports hold the model's function of raw inputs (its input scale and normalisation
folded into the weights); imports give an aecore SAE computing what the folder's
library computes, in eval mode and ready to train further. Folders are written all at
once and an existing one is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from aecore.errors import ConfigError, ModelFileError
from aecore.keywords import checked_keywords
from aecore.sae import saelens_format, sparsify_format
from aecore.sae.saelens_format import load_saelens, save_saelens
from aecore.sae.sparsify_format import load_sparsify, save_sparsify

FORMATS = ("saelens", "sparsify")

__all__ = [
    "FORMATS",
    "detect_format",
    "load_sae",
    "load_saelens",
    "load_sparsify",
    "save_sae",
    "save_saelens",
    "save_sparsify",
]


def detect_format(path: str | os.PathLike) -> str:
    """``"saelens"`` or ``"sparsify"``: which format the folder ``path`` holds."""
    path = Path(path)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "no such SAE folder"
        raise ModelFileError(f"{path}: {problem}")
    has = {p.name for p in path.iterdir()}
    found = [
        fmt
        for fmt, module in (("saelens", saelens_format), ("sparsify", sparsify_format))
        if {module.CONFIG, module.WEIGHTS} <= has
    ]
    if len(found) == 1:
        return found[0]
    if found:
        raise ModelFileError(
            f"{path} holds both a SAELens ({saelens_format.WEIGHTS}) and a sparsify "
            f"({sparsify_format.WEIGHTS}) SAE; name the format (--format)"
        )
    expected = (
        f"expected a SAELens folder ({saelens_format.CONFIG} + {saelens_format.WEIGHTS}) "
        f"or a sparsify folder ({sparsify_format.CONFIG} + {sparsify_format.WEIGHTS})"
    )
    if "model.json" in has:
        raise ModelFileError(f"{path} is an aecore model folder; {expected}")
    # a sparsify run holds one SAE folder per hook point
    inner = sorted(p.name for p in path.iterdir() if (p / sparsify_format.CONFIG).is_file())
    hint = (
        f" (its subfolders {', '.join(inner[:4])}{' ...' if len(inner) > 4 else ''} may be)"
        if inner
        else ""
    )
    raise ModelFileError(
        f"{path} is not an SAE folder{hint}: {expected}; found {', '.join(sorted(has)) or 'nothing'}"
    )


@checked_keywords
def load_sae(path: str | os.PathLike, format: str = "auto"):
    """The aecore SAE in the folder ``path`` (``format``: auto, saelens or sparsify)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "saelens":
        return load_saelens(path)
    if fmt == "sparsify":
        return load_sparsify(path)
    raise ConfigError(
        f"format must be one of 'auto', {', '.join(map(repr, FORMATS))}; got {format!r}"
    )


def save_sae(
    model,
    path: str | os.PathLike,
    format: str,
    *,
    overwrite: bool = False,
    hook_name: str | None = None,
) -> Path:
    """Write ``model`` as a ``format`` folder (saelens or sparsify)."""
    if format == "saelens":
        return save_saelens(model, path, overwrite=overwrite, hook_name=hook_name)
    if format == "sparsify":
        if hook_name is not None:
            raise ConfigError(
                "hook_name is recorded in SAELens folders only; sparsify has no field for it"
            )
        return save_sparsify(model, path, overwrite=overwrite)
    raise ConfigError(f"format must be one of {', '.join(map(repr, FORMATS))}; got {format!r}")
