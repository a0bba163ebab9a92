"""The files of a training run in its ``out_dir``: ``metrics.jsonl`` (one line per
epoch) and ``checkpoint.safetensors`` (model, optimizer, best weights and RNG states as
tensors, the rest as JSON metadata), written atomically; and the resume that reads
them back exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from aecore.base import current_state_keys
from aecore.config import TrainConfig
from aecore.errors import ConfigError, ModelFileError
from aecore.io.atomic import atomic_write_text, write_error
from aecore.io.model_folder import CONFIG
from aecore.io.tensors import (
    check_safetensors_header,
    flatten_state,
    load_tensors,
    save_tensors,
    unflatten_state,
)
from aecore.training.model_identity import check_same_model, normalization_record, registry_name
from aecore.training.state import History, RunState

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
FORMAT = "aecore-checkpoint"
#: files that mark a folder as holding a run (model.json: a model aecore train saved)
RUN_FILES = (CHECKPOINT, METRICS, "model.json", "model.safetensors")
#: training settings a resume may change: they do not alter what the steps compute
RESUMABLE_CHANGES = ("epochs", "device", "checkpoint_every")


def check_fresh(out_dir: Path) -> None:
    """Refuse to start a new run where one (or a saved model) already is."""
    for name in RUN_FILES:
        path = out_dir / name
        # an empty log is what a run that failed before its first epoch once left
        if path.exists() and not (name == METRICS and path.stat().st_size == 0):
            raise ConfigError(
                f"{out_dir} already holds a training run ({name}); resume it with "
                f"resume=True (--resume), pass overwrite=True (--overwrite), or choose "
                f"another out_dir"
            )


def append_metrics(out_dir: Path, record: dict[str, Any], run_id: str = "") -> None:
    path = out_dir / METRICS
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(_metrics_line(record, run_id))
    except OSError as exc:
        raise write_error(path, "append an epoch's line to", exc) from exc


def rewrite_metrics(out_dir: Path, history: History) -> None:
    """metrics.jsonl as the history says (after a resume: drops lines of lost epochs)."""
    lines = "".join(_metrics_line(r, history.run_id) for r in history.epochs)
    atomic_write_text(out_dir / METRICS, lines)


def _metrics_line(record: dict[str, Any], run_id: str) -> str:
    """One epoch's line of metrics.jsonl, with the run it belongs to."""
    return json.dumps({"run": run_id, **record} if run_id else record) + "\n"


def write(
    out_dir: Path,
    model,
    optimizer,
    state: RunState,
    config: TrainConfig,
    *,
    rng_states: list[torch.Tensor],
    sums: dict[str, float],
    count: int,
    cuda_rng: torch.Tensor | None,
    data: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint (rank 0; ``rng_states`` holds every rank's CPU RNG state;
    ``data``: the training and validation rows' summaries, which a resume checks)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v
    optim = flatten_state(optimizer.state_dict(), "optim", tensors) if optimizer else None
    if state.best_state is not None:
        for k, v in state.best_state.items():
            tensors[f"best.{k}"] = v
    for k, v in (state.start_state or {}).items():
        tensors[f"start.{k}"] = v
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.cpu.{rank}"] = rng
    tensors["rng.epoch_start"] = (
        state.epoch_rng if state.epoch_rng is not None else torch.get_rng_state()
    )
    if cuda_rng is not None:
        tensors["rng.cuda"] = cuda_rng
    for i, generator in enumerate(state.loader_generators):
        tensors[f"rng.loader.{i}"] = generator.get_state()
        start = state.epoch_loader_rng[i] if state.epoch_loader_rng else generator.get_state()
        tensors[f"rng.loader_start.{i}"] = start
    meta = {
        "format": FORMAT,
        "model_class": _class_path(model),
        "model_name": registry_name(type(model)),
        "model_config": model.get_config(),
        "normalization": normalization_record(model),
        "optimizer": optim,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "step": state.step,
        "sums": sums,
        "count": count,
        "world_size": len(rng_states),
        "bad_epochs": state.bad_epochs,
        "smoothed": state.smoothed,
        "best_smoothed": state.best_val if state.best_state is not None else None,
        "history": state.history.to_dict(),
        "has_best": state.best_state is not None,
        "training": config.to_dict(),
        "data": data,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / CHECKPOINT, tensors, meta)


def _check_model_not_replaced(out_dir: Path, path: Path) -> None:
    """A model imported into the folder after the checkpoint (``aecore import
    --overwrite``) is not the run's: resuming would replace it. (A model saved by hand
    or by a release before run ids may well be the run's own: not refused.)"""
    config = out_dir / CONFIG
    try:
        if config.stat().st_mtime_ns <= path.stat().st_mtime_ns:
            return
        record = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no saved model, or one that load reports on
    data = record.get("data") if isinstance(record, dict) else None
    origin = data.get("imported_from") if isinstance(data, dict) else None
    if origin is None or record.get("run_id"):
        return
    raise ModelFileError(
        f"cannot resume in {out_dir}: its {CONFIG} holds a model imported from {origin} "
        f"after {CHECKPOINT} was written, which the resumed run would replace; train it "
        f"in another folder, or start afresh there with overwrite=True (--overwrite)"
    )


def read(
    out_dir: Path,
    model,
    optimizer,
    state: RunState,
    config: TrainConfig,
    *,
    rank: int,
    world: int,
    device: torch.device,
    allow_changes: bool = False,
    data: dict[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Restore model, optimizer, run state and RNG states from the checkpoint, after
    checking that it belongs to this model and can continue exactly; with
    ``allow_changes``, training settings may differ: returns {setting: [before, after]}."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        raise ModelFileError(f"cannot resume: no {CHECKPOINT} in {out_dir}")
    _check_model_not_replaced(out_dir, path)
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an aecore checkpoint")
    check_same_model(path, meta, model)
    if meta["world_size"] != world:
        raise ConfigError(
            f"cannot resume exactly: the checkpoint was written by {meta['world_size']} "
            f"process(es); resume with the same number (got {world})"
        )
    # a model whose steps follow the run's progress (a learning-rate decay, an SAE's
    # top-k warm-up) computes other steps under another epoch budget
    paced = getattr(model, "paced_by_run", None)  # the model knows; else judged by its hooks
    if paced is None:
        paced = any(callable(getattr(model, h, None)) for h in ("lr_factor", "set_progress"))
    resumable = tuple(n for n in RESUMABLE_CHANGES if not (paced and n == "epochs"))
    saved_settings = meta.get("training") or meta.get("trainer") or {}
    changed = _changed_settings(saved_settings, config, resumable)
    if changed and not allow_changes:  # before the data: a new seed draws other rows
        used = ", ".join(f"{name}={before!r}" for name, (before, _) in changed.items())
        got = ", ".join(f"{name}={after!r}" for name, (_, after) in changed.items())
        paced_note = "; epochs sets this model's schedule" if paced and "epochs" in changed else ""
        raise ConfigError(
            f"cannot resume exactly: the checkpoint used {used}; got {got} (a resumed run "
            f"keeps its training settings; only {', '.join(resumable)} may change"
            f"{paced_note}; allow_changes=True (--allow-changes) continues with the new "
            f"ones and records the change)"
        )
    reordered = [name for name in ("batch_size", "seed", "shuffle") if name in changed]
    if reordered and meta["epoch_step"]:  # its steps were counted in the old batches
        before = ", ".join(f"{name}={changed[name][0]!r}" for name in reordered)
        raise ConfigError(
            f"cannot resume in the middle of epoch {meta['epoch'] + 1} with another "
            f"{' or '.join(reordered)}: its first {meta['epoch_step']} batches came in the "
            f"old order and size, so the rest of the epoch would skip or repeat rows; "
            f"resume with {before} and epochs={meta['epoch'] + 1} to finish that epoch, "
            f"then with the new settings"
        )
    trained = len((meta.get("history") or {}).get("epochs") or ())
    if config.epochs < trained:  # it would end at once, recording the smaller budget
        raise ConfigError(
            f"cannot resume with epochs={config.epochs}: the run has trained {trained} "
            f"epochs; pass epochs={trained} or more, or start afresh (--overwrite)"
        )
    _check_same_data(path, meta.get("data"), data)  # not a setting: allowed changes aside
    if "optimizer" in changed:
        before, after = changed["optimizer"]
        raise ConfigError(
            f"cannot resume with optimizer={after!r}: the checkpoint holds {before!r}'s "
            f"state; resume with optimizer={before!r}, or start afresh (--overwrite)"
        )
    model.load_state_dict(_state(tensors, "model.", model))
    if optimizer is not None and meta["optimizer"] is not None:
        optimizer.load_state_dict(unflatten_state(meta["optimizer"], tensors))
    if meta["has_best"]:
        state.best_state = _state(tensors, "best.", model)
    if any(k.startswith("start.") for k in tensors):
        state.start_state = _state(tensors, "start.", model)
    state.epoch, state.epoch_step, state.step = meta["epoch"], meta["epoch_step"], meta["step"]
    # rank 0 carries the interrupted epoch's global sums; the rest add to them
    if rank == 0:
        state.sums, state.count = meta["sums"], meta["count"]
    state.bad_epochs = meta["bad_epochs"]
    state.history = History.from_dict(meta["history"])
    # older checkpoints judged the raw loss: their best raw loss is the best value
    best = meta.get("best_smoothed", state.history.best_val_loss)
    state.best_val = best if best is not None else float("inf")
    state.smoothed = meta.get("smoothed", best)
    state.epoch_rng = tensors["rng.epoch_start"]
    for i, generator in enumerate(state.loader_generators):  # where the run left them
        if f"rng.loader.{i}" in tensors:
            generator.set_state(tensors[f"rng.loader.{i}"])
    state.epoch_loader_rng = [
        tensors[f"rng.loader_start.{i}"]
        for i in range(len(state.loader_generators))
        if f"rng.loader_start.{i}" in tensors
    ]
    torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    if optimizer is not None:  # the requested rate and decay, not the saved state's
        for group in optimizer.param_groups:
            if "lr" in changed:
                group["lr"] = config.lr
            if "weight_decay" in changed and "weight_decay" in group:
                group["weight_decay"] = config.weight_decay
    return changed


def interrupted_message(reason: str, out_dir: Path | None, step: int, pretraining: bool) -> str:
    """What a stopped run says: where its checkpoint is, or why there is none."""
    if pretraining:  # (a model's layer-wise pretraining keeps no resumable state)
        return (f"training interrupted by {reason} during pretraining, which is not "
                f"checkpointed: nothing saved; train again (without --resume)")  # fmt: skip
    if out_dir is None:
        return f"training interrupted by {reason}; no out_dir, nothing saved"
    return (
        f"training interrupted by {reason} at step {step}; "
        f"checkpoint saved in {out_dir}. Resume with --resume (resume=True)."
    )


def check_split_kept(out_dir: Path, config: TrainConfig, settings: tuple[str, ...]) -> None:
    """Refuses to resume the run in ``out_dir`` with other values of ``settings``, those
    that drew its data split (``aecore train``'s seed and val_fraction), even with
    allow_changes: a new split would train on the old test rows and score the model on
    rows it learnt (``read`` then refuses the other training rows; this says why).
    Nothing to check without a checkpoint (``read`` says so)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return
    raw = (check_safetensors_header(path).get("__metadata__") or {}).get("aecore")
    try:
        saved = (json.loads(raw) if raw else {}).get("training") or {}
    except (json.JSONDecodeError, AttributeError):
        return  # not an aecore checkpoint: ``read`` says so
    requested = config.to_dict()
    for name in settings:
        if name in saved and saved[name] != requested[name]:
            raise ConfigError(
                f"cannot resume with {name}={requested[name]!r}: the run's train, validation "
                f"and test rows were drawn with {name}={saved[name]!r}, and another draw "
                f"would train on its test rows (even with --allow-changes); resume with "
                f"{name}={saved[name]!r}, or start afresh (--overwrite)"
            )


def _check_same_data(path: Path, saved: Any, now: dict[str, Any] | None) -> None:
    """A resume trains on the rows the run started on, allowed changes of settings or
    not: rows moved in from a validation or test split would be judged on (checkpoints
    from before this record carry none: not checked)."""
    if not isinstance(saved, dict) or now is None:
        return
    for part in ("train", "val"):
        a, b = saved.get(part), now.get(part)
        if a is None and b is None:
            continue
        same = a is not None and b is not None and a["rows"] == b["rows"]
        for key in ("sum", "sample"):  # (older checkpoints recorded fewer)
            if same and a.get(key) is not None and b.get(key) is not None:
                same = math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-9)
        if not same:
            before, after = (f"{s['rows']} rows" if s else "none" for s in (a, b))
            other = ", other values" if before == after else ""
            raise ConfigError(
                f"cannot resume exactly: {path} was trained on other {part} data "
                f"({before}; this run gives {after}{other}); resume on the same data, split "
                f"and seed (even with --allow-changes), or start afresh (--overwrite)"
            )


def _state(tensors: dict[str, torch.Tensor], prefix: str, model) -> dict:
    """The state dict stored under ``prefix``, in the keys the model has now."""
    n = len(prefix)
    return current_state_keys(model, {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)})


def _class_path(model) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _changed_settings(
    saved: dict[str, Any], config: TrainConfig, resumable: tuple[str, ...] = RESUMABLE_CHANGES
) -> dict[str, list[Any]]:
    """The training settings (older checkpoints recorded some only) that differ from the
    saved ones, apart from ``resumable``: {setting: [saved, requested]}."""
    requested = config.to_dict()
    return {
        name: [value, requested[name]]
        for name, value in saved.items()
        if name in requested and name not in resumable and value != requested[name]
    }
