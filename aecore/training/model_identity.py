"""Whether a checkpoint belongs to the model a resume is given: the same registered
model, hyperparameters and normalisation (checked before any state is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aecore.errors import ModelFileError
from aecore.io.model_folder import saved_config as saved_config_of


def check_same_model(path: Path, meta: dict[str, Any], model) -> None:
    """A ModelFileError naming what differs between the checkpoint at ``path`` (its
    metadata ``meta``) and ``model``."""
    # another registered model whose config rebuilds this one (a denoising model's from
    # an ae's, its own keys at their defaults) would resume and replace the saved model;
    # an unregistered subclass (instrumented, say) resumes its registered parent's run
    saved_name = meta.get("model_name") or registry_name(meta.get("model_class"))
    this_name = registry_name(type(model))
    if saved_name is not None and this_name is not None and saved_name != this_name:
        raise ModelFileError(
            f"cannot resume: {path} was written for model {saved_name!r}, not "
            f"{this_name!r}: resume with the model it trained, or start afresh (--overwrite)"
        )
    if not _same_model(model, meta["model_config"]):
        raise ModelFileError(
            f"cannot resume: {path} was written for a model with other hyperparameters "
            f"({_config_changes(meta['model_config'], model.get_config())}): give the ones "
            f"it was trained with (--set, --latent-dim), or start afresh (--overwrite)"
        )
    saved_norm, norm = meta.get("normalization"), normalization_record(model)
    if saved_norm is not None and norm is not None and not _same_scaling(saved_norm, norm):
        before, after = _describe(saved_norm), _describe(norm)
        if before == after:  # the same kind fitted on other rows: other data
            raise ModelFileError(
                f"cannot resume: {path} was trained on other data (normalised {before} "
                f"with scale {_first(saved_norm, 'scale')} and shift "
                f"{_first(saved_norm, 'shift')}; this data gives {_first(norm, 'scale')} and "
                f"{_first(norm, 'shift')}); resume on the data it was trained on, or start "
                f"afresh (--overwrite)"
            )
        raise ModelFileError(
            f"cannot resume: {path} was trained on data normalised {before}, and this run "
            f"normalises it {after}; resume with the normalisation it was trained with "
            f"(--normalize), or start afresh (--overwrite)"
        )


def registry_name(cls: type | str | None) -> str | None:
    """The registry name of a model class, or of the entry point naming ``module.qualname``
    (an older checkpoint's record: nothing is imported for it); None where there is none
    (an unregistered subclass)."""
    from aecore import registry

    if isinstance(cls, str):
        targets = {e.name: registry._target_parts(e.target) for e in registry.model_entries()}
        return next((n for n, t in targets.items() if ".".join(t) == cls), None)
    try:
        return registry.name_of(cls)
    except registry.RegistryError:
        return None


def _config_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``"hidden [32] then, [256] now; dropout 0.1 then, 0.0 now"``."""
    keys = [k for k in {**saved, **now} if saved.get(k) != now.get(k)]
    return "; ".join(f"{k} {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys)


def _same_model(model, saved_config: dict[str, Any]) -> bool:
    """Whether the checkpoint's model config builds this model. Compared after a rebuild,
    so that hyperparameters added since the checkpoint (at their defaults) match, and
    without those that only change how the trained model scores."""
    scoring = set(getattr(model, "scoring_hparams", ()))
    mine = {k: v for k, v in model.get_config().items() if k not in scoring}
    if {k: v for k, v in saved_config.items() if k not in scoring} == mine:
        return True
    try:
        rebuilt = type(model)(**saved_config_of(type(model), saved_config)).get_config()
    except Exception:  # a config this class no longer takes
        return False
    return {k: v for k, v in rebuilt.items() if k not in scoring} == mine


def normalization_record(model) -> dict[str, Any] | None:
    norm = getattr(model, "normalization", None)
    return norm.to_dict() if norm is not None else None


def _same_scaling(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("kind") != b.get("kind") or len(a.get("shift", ())) != len(b.get("shift", ())):
        return False
    return all(np.allclose(a.get(k, ()), b.get(k, ()), rtol=1e-9) for k in ("shift", "scale"))


def _first(norm: dict[str, Any], key: str) -> str:
    values = list(norm.get(key, ()))
    return f"{values[0]:.4g}" + (", ..." if len(values) > 1 else "") if values else "none"


def _describe(norm: dict[str, Any]) -> str:
    if norm.get("kind", "none") == "none":
        return "not at all"
    size = len(norm.get("scale", ()))
    return f"by {norm['kind']} ({'per feature' if size > 1 else 'one scale for all'})"
