"""Model folders: ``model.safetensors`` (weights) + ``model.json`` (what rebuilds it).

Loading never unpickles: weights come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aecore import params
from aecore._version import __version__
from aecore.base import current_state_keys
from aecore.config import FIELDS, TrainConfig
from aecore.data.normalization import Normalization
from aecore.detection import ScoreThreshold
from aecore.errors import (
    AecoreError,
    ConfigError,
    DataError,
    FileWriteError,
    ModelFileError,
    RegistryError,
    warn,
)
from aecore.io.atomic import atomic_write_text
from aecore.io.lock import writer_of
from aecore.io.tensors import check_safetensors_header, load_tensors, save_tensors
from aecore.keywords import checked_keywords
from aecore.model_config import config_json
from aecore.registry import check_hyperparameters, model_class, name_of

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
FORMAT = "aecore-model"
FORMAT_VERSION = 1


@checked_keywords
def save(
    model,
    directory: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    training: TrainConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (and its ``model.normalization``) into ``directory``;
    ``training`` is the config of the run that trained it (read back by ``aecore eval``).

    Refuses to replace an existing saved model unless ``overwrite=True``. Nothing is
    written until the whole record is known to serialise; then each file is written
    atomically, weights first, both marked with one save id, so that ``load`` never
    pairs a ``model.json`` with another save's weights (a crash between them, or a
    concurrent load).
    """
    if not isinstance(model, torch.nn.Module) and isinstance(
        getattr(model, "model_", None), torch.nn.Module
    ):
        raise ConfigError(
            f"aecore.save takes a model; got a fitted {type(model).__name__}: save its "
            f"model_ (aecore.save(estimator.model_, ...)), which carries its normalisation "
            f"and any detector threshold, or pickle the estimator"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ModelFileError(f"cannot save into {directory}: it exists and is not a directory")
    if (directory / CONFIG).exists() and not overwrite:
        raise ModelFileError(
            f"{directory} already holds a saved model; pass overwrite=True (--overwrite) "
            f"or choose another directory"
        )
    if (directory / WEIGHTS).exists() and not overwrite:  # someone else's weights file
        raise ModelFileError(
            f"{directory} already holds {WEIGHTS} (not saved by aecore: there is no "
            f"{CONFIG}); pass overwrite=True (--overwrite) to replace it, or choose "
            f"another directory"
        )
    name = name_of(model)
    config = json.loads(config_json(model, ModelFileError))
    norm = getattr(model, "normalization", None) or Normalization("none")
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "config": config,
        "input_shape": list(model.input_shape),
        "latent_dim": model.latent_dim,
        "normalization": norm.to_dict(),
        "metrics": metrics or {},
        "data": data or {},
        "training": training.to_dict() if training is not None else None,
        "aecore_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    detector = getattr(model, "detector", None)
    if detector is not None:  # aecore.AnomalyDetector's threshold
        record["detector"] = detector.to_dict()
    feature_names = getattr(model, "feature_names", None)
    if feature_names is not None:  # the estimators' columns, which served rows must match
        record["feature_names"] = [str(name) for name in feature_names]
    run_id = getattr(model, "run_id", "")  # the training run (Trainer.fit sets it)
    if run_id:
        record["run_id"] = run_id
    record["save_id"] = uuid.uuid4().hex
    text = _record_text(record, directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileWriteError(f"could not create the folder {directory}: {exc}") from None
    # a model may save an equivalent form of its state (an SAE folds its input scale)
    saved_state = getattr(model, "saved_state_dict", None)
    state = saved_state() if saved_state is not None else model.state_dict()
    meta = {"save_id": record["save_id"], **({"run_id": run_id} if run_id else {})}
    save_tensors(directory / WEIGHTS, _unique_state(state), meta)
    atomic_write_text(directory / CONFIG, text)
    return directory


def _record_text(record: dict[str, Any], directory: Path) -> str:
    """``model.json``'s text; numpy numbers and paths (a caller's metrics and data) as
    JSON's. A ModelFileError naming the field that does not serialise."""

    def plain(value):
        if isinstance(value, (np.generic, np.ndarray)):
            return value.tolist()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")

    try:
        return json.dumps(record, indent=2, default=plain) + "\n"
    except (TypeError, ValueError) as exc:
        field = next(k for k, v in record.items() if not _serialises(v, plain))
        raise ModelFileError(
            f"cannot save into {directory}: its {field!r} record does not serialise: {exc}; "
            f"nothing was written"
        ) from None


def _serialises(value, default) -> bool:
    try:
        json.dumps(value, default=default)
    except (TypeError, ValueError):
        return False
    return True


def _unique_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with tied tensors stored once (safetensors refuses shared storage);
    load restores ties by loading into the model itself."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t
    return out


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model.json`` of a model folder, checked for the fields load needs."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "a file" if directory.exists() else "no such directory"
        raise ModelFileError(f"{directory}: not a model folder ({what})")
    path = directory / CONFIG
    if not path.is_file():
        foreign = (directory / "cfg.json").is_file()  # SAELens's or sparsify's config
        hint = "; a SAELens or sparsify SAE? aecore.sae.formats.load_sae reads it" * foreign
        raise ModelFileError(f"{directory}: not a model folder (no {CONFIG} file){hint}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ModelFileError(f"{path} could not be read: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an aecore model record (no 'format': '{FORMAT}')")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path}: 'format_version' must be an integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer aecore (format {record['format_version']}); "
            f"upgrade aecore to load it"
        )
    for field in ("model", "config"):
        if field not in record:
            raise ModelFileError(f"{path} lacks the field {field!r}")
    if not isinstance(record["config"], dict):
        raise ModelFileError(f"{path}: 'config' must be an object")
    return record


#: how long load waits for a save under way to write its second file
SAVE_WAIT_SECONDS = 2.0


@checked_keywords
def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a saved model in eval mode, with ``model.normalization`` and
    ``model.metadata`` (the whole ``model.json``) set."""
    device = params.torch_device(device)
    directory = Path(directory)
    record, state, weights_meta = _read_one_save(directory)
    try:
        cls = model_class(record["model"])
    except RegistryError as exc:
        raise ModelFileError(f"{directory}: {exc}") from None
    try:
        config = saved_config(cls, record["config"])
        check_hyperparameters(record["model"], cls, config)
    except (ConfigError, TypeError) as exc:
        raise ModelFileError(
            f"{directory}: the saved config does not fit {record['model']}: {exc}"
        ) from None
    try:
        model = cls(**config)
    except AecoreError as exc:
        raise ModelFileError(f"{directory}: the saved config does not build: {exc}") from None
    except TypeError as exc:
        raise ModelFileError(
            f"{directory}: the saved config does not fit {record['model']}: {exc}"
        ) from None
    for field, built in (
        ("input_shape", list(model.input_shape)),
        ("latent_dim", model.latent_dim),
    ):
        if field in record and record[field] != built:  # a summary of config, edited alone
            raise ModelFileError(
                f"{directory}: {CONFIG} gives {field} {record[field]!r}, but its config builds "
                f"{built!r}; the top-level {field} restates the config: edit that instead"
            )
    check_one_run(directory, record, weights_meta)
    load_weights(model, state, directory / WEIGHTS)
    model.run_id = record.get("run_id", "")
    try:
        model.normalization = Normalization.from_dict(record.get("normalization"))
        model.normalization.check_features(model.input_size)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{directory}: malformed normalization in {CONFIG}: {exc}") from None
    training_config(record, directory)  # a malformed record fails here, not at eval
    if record.get("detector") is not None:
        try:
            model.detector = ScoreThreshold.from_dict(record["detector"])
        except DataError as exc:
            raise ModelFileError(f"{directory}: {exc}") from None
    names = record.get("feature_names")
    if names is not None:
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ModelFileError(f"{directory}: malformed feature_names in {CONFIG}")
        if len(names) != model.input_size:
            raise ModelFileError(
                f"{directory}: {CONFIG} names {len(names)} features; the model has "
                f"{model.input_size}"
            )
        model.feature_names = names
    model.metadata = record
    model.data_initialised = True  # trained weights: fit continues from them
    return model.to(device).eval()


def saved_config(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keywords that rebuild a saved config: hyperparameters added since it was
    written take the values that reproduce the model as it was saved."""
    return {**getattr(cls, "legacy_defaults", {}), **config}


def training_config(record: dict[str, Any], directory: Any = "") -> TrainConfig:
    """The TrainConfig a saved model was trained with (``model.json``'s ``training``);
    the defaults for a model saved without one (trained outside aecore's Trainer)."""
    saved = record.get("training")
    if saved is None:
        return TrainConfig()
    if isinstance(saved, dict) and set(saved) - set(FIELDS):
        # written by a newer aecore: the settings this version knows still apply
        unknown = sorted(set(saved) - set(FIELDS))
        warn(
            f"{directory}: ignoring training settings this aecore does not know: "
            f"{', '.join(unknown)}"
        )
        saved = {k: v for k, v in saved.items() if k in FIELDS}
    try:
        return TrainConfig.from_dict(saved)
    except ConfigError as exc:
        raise ModelFileError(f"{directory}: malformed training config in {CONFIG}: {exc}") from None


def _read_one_save(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict]:
    """``model.json``, the weights and their metadata, from one save: a save under way
    writes the weights first, so a record whose save id the weights do not carry is
    read again until that save's record lands (folders saved before save ids, and
    weights rewritten by another tool, which drops the id: as they are)."""
    deadline = time.monotonic() + SAVE_WAIT_SECONDS
    while True:
        record = read_record(directory)
        path = directory / WEIGHTS
        if not path.is_file():
            raise ModelFileError(f"{directory}: not a model folder (no {WEIGHTS} file)")
        state, meta = load_tensors(path)
        meta = meta if isinstance(meta, dict) else {}
        if None in (record.get("save_id"), meta.get("save_id")) or (
            record["save_id"] == meta["save_id"]
        ):
            return record, state, meta
        if time.monotonic() > deadline:
            check_one_run(directory, record, meta)  # two runs' files: its own words
            raise ModelFileError(
                f"{directory}: its {CONFIG} and {WEIGHTS} come from different saves (a "
                f"save into it is under way, or stopped between its two files): load it "
                f"when the save has finished, or save the model again"
            )
        time.sleep(0.02)


def load_weights(model, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load the weights ``state`` (read from ``path``) into ``model``, naming mismatches."""
    state = current_state_keys(model, state)  # written by an older version of the model
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if floats == {torch.float64}:  # a float64 model loads in float64 (16-bit weights
        model.double()  # load into float32, in which every model trains and serves)
    expected = model.state_dict()
    problems = []
    tied = set(expected) - set(_unique_state(expected))
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key} has shape {tuple(state[key].shape)}, the config builds "
                f"{tuple(expected[key].shape)}"
            )
    if problems:
        raise ModelFileError(
            f"{path}: the weights do not match the model config: {'; '.join(problems)}"
        )
    restore = getattr(model, "restore_saved_state", None)  # saved_state_dict's inverse
    model.load_state_dict(restore(state) if restore is not None else state, strict=False)


def check_one_run(directory: Path, record: dict[str, Any], weights_meta: dict) -> None:
    """A ModelFileError unless the folder's weights (their metadata ``weights_meta``)
    come from the run ``model.json`` names; a warning when its checkpoint or metrics
    come from another run (an overwriting run under way, or stopped: the saved model is
    intact and loads). Files written before run ids carry none: not checked."""
    run_id = record.get("run_id")
    if not run_id:
        return
    found: dict[str, set[str]] = {}
    if weights_meta.get("run_id"):
        found[WEIGHTS] = {weights_meta["run_id"]}
    checkpoint = directory / "checkpoint.safetensors"
    if checkpoint.is_file():
        raw = (check_safetensors_header(checkpoint).get("__metadata__") or {}).get("aecore")
        meta = json.loads(raw) if raw else {}
        history = meta.get("history") if isinstance(meta, dict) else None
        other = history.get("run_id") if isinstance(history, dict) else history
        if other:
            found[checkpoint.name] = {other}
    metrics = directory / "metrics.jsonl"
    if metrics.exists():
        runs = set()
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                runs.add(json.loads(line).get("run"))
            except (ValueError, AttributeError):
                continue
        found["metrics.jsonl"] = runs - {None}
    wrong = {name: sorted(ids) for name, ids in found.items() if ids - {run_id}}
    listed = "; ".join(f"{name} from run(s) {', '.join(ids)}" for name, ids in wrong.items())
    if wrong and WEIGHTS not in wrong:
        warn(
            f"{directory}: the saved model is run {run_id}'s, but {listed} (another run "
            f"wrote them, and is under way or was stopped): they do not describe this model",
            UserWarning,
        )
        return
    if wrong:
        writer = writer_of(directory)
        if writer is not None:
            raise ModelFileError(
                f"{directory} is being written by {writer}: its {CONFIG} is an earlier "
                f"run's ({run_id}) while {listed}; load it when that run has finished"
            )
        raise ModelFileError(
            f"{directory} mixes runs: {CONFIG} names run {run_id}, but {listed}; the files "
            f"do not belong together (two runs wrote this folder): retrain into a new folder"
        )
