"""The generic trainer: any ``aecore.Autoencoder`` through its ``loss`` (or its own
``train_step``), seeded, resumable, with early stopping and atomic checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aecore import params
from aecore.base import Autoencoder
from aecore.config import TrainConfig
from aecore.errors import ConfigError, IgnoredSettingWarning, warn
from aecore.io.lock import FolderLock
from aecore.keywords import checked_keywords
from aecore.model_config import config_json
from aecore.training.batches import Batches
from aecore.training.loop import TrainingRun
from aecore.training.state import History


class Trainer:
    """Fits models: ``Trainer(epochs=30, lr=1e-3).fit(model, x, x_val)``.

    The training settings are a :class:`aecore.TrainConfig` (``config``), with any of its
    fields given as keywords on top (``Trainer(config, epochs=5)``). The rest says where
    the run lives, not how it trains:

    * ``out_dir``: writes ``metrics.jsonl`` and an atomic ``checkpoint.safetensors``
      (every ``checkpoint_every`` steps and at each epoch end);
    * ``resume=True``: continue the run in ``out_dir`` exactly; a changed training
      setting is refused unless ``allow_changes=True``, which continues with it, says
      so and records it in ``History.changes`` (and so in ``model.json``); other
      training rows are refused either way;
    * ``overwrite=True``: start afresh even where ``out_dir`` holds a run;
    * ``progress``: progress bars and log lines on stderr (default: when it is a terminal).

    ``fit`` ends with the weights that did best: with validation data, the best epoch's
    (judged on the smoothed validation loss, see ``TrainConfig.smoothing``) unless the
    final ones are as good within the curve's noise; without, the final ones unless
    they do worse on the training data than the start did (a start such as PCA's is
    never lost). A model that starts at PCA's solution (``pca_start``) keeps its start
    unless the trained weights beat it on the validation data by more than two standard
    errors of the paired difference. ``History.kept_epoch`` says which (0: the start).

    ``request_stop(reason)`` (e.g. from a signal handler) makes the running ``fit``
    checkpoint at the next step and raise ``TrainingInterrupted``.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool | None = None,
        allow_changes: bool = False,
        setting_names: dict[str, str | None] | None = None,
        setting_values: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        if config is not None and not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be an aecore.TrainConfig; got {type(config).__name__}")
        if isinstance(settings.get("device"), torch.device):  # the config stores its name
            settings["device"] = str(settings["device"])
        self.config = (config or TrainConfig()).replace(**settings)
        self.device = params.torch_device(self.config.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = bool(resume)
        self.allow_changes = bool(allow_changes)
        if self.allow_changes and not self.resume:
            raise ConfigError("allow_changes=True applies to resume=True (--resume) only")
        self.overwrite = bool(overwrite)
        self.progress = progress
        if self.resume and self.out_dir is None:
            raise ConfigError("resume=True needs out_dir (where the checkpoint is)")
        if self.config.checkpoint_every and self.out_dir is None:
            warn(
                f"checkpoint_every={self.config.checkpoint_every} writes checkpoints into "
                f"out_dir, and this Trainer has none: no checkpoint is written. Pass "
                f"out_dir=...",
                IgnoredSettingWarning,
            )
        #: what the caller calls the settings in messages (a scikit-learn estimator's
        #: validation_fraction; such a caller takes no val_data either; None: a setting
        #: the caller does not offer, which the advice then leaves out)
        self.setting_names = dict(setting_names or {})
        #: how the caller states a setting's value where it chose the number the trainer
        #: got (an estimator's validation_fraction='auto'), in messages about it
        self.setting_values = dict(setting_values or {})
        #: why the running fit should stop at its next step (set by request_stop)
        self.stop_requested: str | None = None

    def setting_name(self, setting: str) -> str | None:
        """What this trainer's caller calls ``setting`` (None: a setting it does not offer)."""
        return self.setting_names.get(setting, setting)

    def stated(self, setting: str, value: Any) -> str:
        """``name=value`` as the caller would write it."""
        return f"{self.setting_name(setting)}={self.setting_values.get(setting, f'{value:g}')}"

    def request_stop(self, reason: str) -> None:
        self.stop_requested = reason

    @checked_keywords
    def fit(self, model, data: Any, val_data: Any = None) -> History:
        """Train ``model`` on ``data`` (arrays, tensors, torch Datasets or a DataLoader),
        with early stopping and the best weights judged on ``val_data``; without it, on
        ``config.val_fraction`` of ``data``'s rows held out (not from a DataLoader)."""
        if not isinstance(model, Autoencoder):
            raise ConfigError(
                f"Trainer.fit expects an aecore.Autoencoder; got {type(model).__name__}"
            )
        config_json(model)  # checkpoints and saved folders record it: fail before training
        if not model.uses_optimizer and not callable(getattr(model, "train_step", None)):
            raise ConfigError(
                f"{type(model).__name__} sets uses_optimizer = False (it updates its own "
                f"parameters) but has no train_step(x) method doing the update: define one "
                f"returning its loss terms, or leave uses_optimizer True"
            )
        _warn_ignored_optimizer_settings(model, self.config)
        _drop_stale_threshold(model)
        c = self.config.for_model(model)
        given = train = Batches(data, c.batch_size, c.shuffle, c.seed, "data")
        train.check_finite()
        if val_data is not None:
            val = Batches(val_data, c.batch_size, False, c.seed, "val_data")
            val.check_finite()
        else:
            split = train.hold_out(c.val_fraction, c.seed) if c.val_fraction else None
            train, val = split if split is not None else (train, None)
            if split is None and train.loader is None and round(c.val_fraction * train.n):
                warn(
                    f"{self.stated('val_fraction', c.val_fraction)} would hold out all "
                    f"{train.n} rows and leave none to train on: the run trains on every "
                    f"row without validation",
                    IgnoredSettingWarning,
                )
            if val is not None and val.n > train.n:
                warn(
                    f"{self.stated('val_fraction', c.val_fraction)} holds out {val.n} of the {given.n} rows, "
                    f"so the model trains on {train.n}: a validation split needs far fewer "
                    f"rows than training does (the default is {DEFAULTS.val_fraction:g})",
                    UserWarning,
                )
        if val is None:
            _warn_settings_needing_validation(c, train.loader is not None, self)
        if c.optimizer == "lbfgs" and len(train) > 1:  # its curvature pairs mix batches
            what = (
                f"the DataLoader (batch_size={train.loader.batch_size}) yields"
                if train.loader is not None
                else f"batch_size={c.batch_size} splits the training rows into"
            )
            warn(
                f"optimizer='lbfgs' is a full-batch method, and {what} {len(train)} batches: "
                f"use one batch of every training row (batch_size, --batch-size, at least "
                f"the rows)",
                UserWarning,
            )
        # data-dependent initialisation sees every row the user trains on: a PCA start
        # is then PCA's solution on those rows, whatever the trainer holds out
        run = TrainingRun(self, c, model, train, val, init_data=given)
        try:
            if self.out_dir is None or not writes_files():
                return run.execute()
            with FolderLock(self.out_dir, "train into"):  # one run writes a folder at a time
                return run.execute()
        finally:
            # a stop request ends this fit, not every later one of this trainer
            self.stop_requested = None


DEFAULTS = TrainConfig()
#: the optimizer's settings: no effect on a model that updates its own parameters
OPTIMIZER_SETTINGS = ("lr", "optimizer", "weight_decay", "grad_clip")


#: the settings that judge validation losses: no effect on a run without validation data
VALIDATION_SETTINGS = ("patience", "min_delta", "smoothing")


def _warn_settings_needing_validation(c: TrainConfig, loader: bool, trainer: Trainer) -> None:
    changed = [
        f"{name}={getattr(c, name)!r}"
        for name in VALIDATION_SETTINGS
        if getattr(c, name) is not None and getattr(c, name) != getattr(DEFAULTS, name)
    ]
    if not changed:
        return
    fraction = trainer.setting_name("val_fraction")
    stated = trainer.stated("val_fraction", c.val_fraction)
    why = (
        "a DataLoader holds none out"
        if loader
        else stated
        if not c.val_fraction
        else f"{stated} leaves no split of these rows"
    )
    verb = "needs" if len(changed) == 1 else "need"
    takes_val_data = fraction == "val_fraction"  # not a caller that names it otherwise
    warn(
        f"{', '.join(changed)} {verb} validation data, and this run has none "
        f"({'no val_data; ' * takes_val_data}{why}): it runs all {c.epochs} epochs. Pass "
        f"{'val_data, or ' * takes_val_data}a {fraction} > 0 with enough rows",
        IgnoredSettingWarning,
    )


def _drop_stale_threshold(model) -> None:
    """A detector's threshold is a quantile of the training rows' scores under the
    weights it was fitted with: training moves the scores, so it would flag another share
    of rows than its contamination says, and would be saved and exported so."""
    detector = getattr(model, "detector", None)
    if detector is None:
        return
    model.detector = None
    warn(
        f"{type(model).__name__} carries an anomaly threshold fitted to its scores "
        f"before this training (contamination {detector.contamination:g}); training "
        f"changes the scores, so the threshold is dropped: fit aecore.AnomalyDetector "
        f"for a new one",
        UserWarning,
    )


def _warn_ignored_optimizer_settings(model, config: TrainConfig) -> None:
    if model.uses_optimizer:
        return
    changed = [
        f"{name}={getattr(config, name)!r}"
        for name in OPTIMIZER_SETTINGS
        if getattr(config, name) != getattr(DEFAULTS, name)
    ]
    if not changed:
        return
    # the model's own settings of those names (an RBM's lr and weight_decay)
    own = [
        f"{name}=... (now {getattr(model, name):g})"
        for name in OPTIMIZER_SETTINGS
        if getattr(config, name) != getattr(DEFAULTS, name)
        and isinstance(getattr(model, name, None), (int, float))
    ]
    verb = "does" if len(changed) == 1 else "do"
    warn(
        f"{type(model).__name__} updates its own parameters (train_step), so the "
        f"trainer's {', '.join(changed)} {verb} not apply to it; set the model's own "
        f"hyperparameters instead: {', '.join(own) or 'lr=...'} (--set on the command "
        f"line, or aecore.create(..., ...))",
        IgnoredSettingWarning,
    )


def writes_files() -> bool:
    """Whether this process writes the run's files: under torchrun, rank 0 only."""
    return os.environ.get("RANK", "0") in ("", "0")
