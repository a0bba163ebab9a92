"""``aecore train`` and ``aecore eval``. The training flags are generated from
``TrainConfig``'s fields (same names, defaults and help), so the command line cannot
drift from the library's defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

from aecore.cli.tables import format_ratio, print_table
from aecore.config import TrainConfig
from aecore.data.sources import SOURCE_FORMS
from aecore.data.split import SPLIT_METHODS
from aecore.errors import ConfigError, warn

#: which rows a saved anomaly threshold was fitted on (``metrics["threshold_rows"]``)
ROWS = {"val": "validation", "train": "training"}


def add_commands(sub) -> None:
    s = sub.add_parser("train", help="train a model on a data source and save it")
    s.add_argument("model", help="registry name (see `aecore models`)")
    s.add_argument("--data", required=True, help=SOURCE_FORMS)
    s.add_argument("--out", required=True, help="model folder to write")
    s.add_argument("--latent-dim", type=int, default=8, help="code size (default 8)")
    s.add_argument(
        "--normalize",
        default="auto",
        choices=["auto", "minmax", "standardize", "none"],
        help="scaling fitted on the training rows (auto: the model's own choice, e.g. "
        "none for sparse autoencoders on activations; else each feature rescaled where "
        "the features are quantities in units of their own; else minmax over all "
        "features; the vae, rbm and deep get Gaussian units on real-valued data)",
    )
    s.add_argument(
        "--split",
        default="random",
        choices=list(SPLIT_METHODS),
        help="70/10/20 split at random (seeded by --seed) or stratified by label",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model hyperparameter (JSON value; True, False, None as JSON's), repeatable",
    )
    add_config_flags(s)
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue with changed training settings (listed and recorded)",
    )
    s.add_argument(
        "--contamination",
        type=float,
        default=None,
        help="also fit an anomaly threshold flagging this share of the validation rows "
        "(the training rows where they are too few), in (0, 0.5], by the model's default "
        "score (what `aecore predict` uses)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace a run or model in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (small models on a busy machine: 1)",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="test reconstruction error of a saved model vs PCA")
    s.add_argument("model_dir")
    s.add_argument("--data", default=None, help="data source (default: the one it was trained on)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``); a flag that
    is not given leaves the field at its default. Optional settings take ``none``."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        optional = "None" in str(f.type)
        help_text = f"{f.metadata['help']} (default: {_show(f.default)})"
        if f.type in (bool, "bool"):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kind = float if "float" in str(f.type) else int if "int" in str(f.type) else str
        parser.add_argument(
            flag,
            dest=f.name,
            type=_optional(kind) if optional else kind,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=help_text,
        )


def _show(value: Any) -> str:
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if hasattr(args, f.name)
        }
    )


#: Python's spellings of JSON's literals: read as strings, "False" would be true
PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value``: values are JSON when they parse as JSON (Python's True,
    False and None too), else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set expects key=value (e.g. hidden=[256,128]); got {item!r}")
        if key in out:  # the earlier value would be dropped without a word
            raise ConfigError(f"--set {key} is given twice; give it once")
        if raw.strip() in PYTHON_LITERALS:
            out[key] = PYTHON_LITERALS[raw.strip()]
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            if raw.strip()[:1] in ("[", "{", '"'):  # meant as JSON, not a plain string
                raise ConfigError(f"--set {item}: not valid JSON ({exc.msg})") from None
            out[key] = raw
    return out


def cmd_train(args) -> int:
    from aecore.pipeline import train

    if args.resume and args.overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite replaces it: give one"
        )
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder to write the model into")
    config = config_from_args(args)
    hparams = parse_set(args.set)
    with GracefulStop() as stopper:
        result = train(
            args.model,
            args.data,
            args.out,
            latent_dim=args.latent_dim,
            hparams=hparams,
            config=config,
            normalize=args.normalize,
            split=args.split,
            resume=args.resume,
            allow_changes=args.allow_changes,
            overwrite=args.overwrite,
            progress=None if not args.quiet else False,
            trainer_hook=stopper.attach,
            contamination=args.contamination,
        )
    m = result.metrics
    if not result.history.is_main:
        return 0
    pca = (
        f"PCA {m['pca_test_mse']:.6g}, ratio {format_ratio(m['ratio_to_pca'])}"
        if m["ratio_to_pca"] is not None
        # PCA's error is rounding: a code as wide as the data (an SAE's), or data that
        # varies in fewer directions than the code has units (constant data, say)
        else "PCA of as many components is exact: no ratio"
    )
    print(
        f"saved {args.model} to {args.out}: test MSE {m['test_mse']:.6g} ({pca}), "
        f"weights of epoch {m['kept_epoch']} of {m['epochs_run']}"
    )
    detector = result.model.detector if args.contamination is not None else None
    if detector is not None:
        print(
            f"anomaly threshold: {detector.kind} score above {detector.threshold:.6g} flags "
            f"{detector.contamination:g} of the {ROWS[m['threshold_rows']]} rows (aecore "
            f"predict uses it)"
        )
    return 0


def cmd_eval(args) -> int:
    import numpy as np

    from aecore.data import prepare_like
    from aecore.data.dataset import rows_in_shape
    from aecore.io.model_folder import load
    from aecore.pipeline import evaluate
    from aecore.training.state import listed_changes

    model = load(args.model_dir)
    names = getattr(model, "feature_names", None)
    if args.data is not None and names is not None:  # columns go by name, as encode's do
        from aecore.data.sources import source_columns
        from aecore.runtime.arrays import check_columns

        columns = source_columns(args.data)
        if columns is not None:
            check_columns(columns, names)
    prepared = prepare_like(model.metadata, args.data)
    dataset = prepared.dataset  # --data digits for a model of digits:image, say
    if isinstance(dataset.x, np.ndarray):  # not a lazy store (an activation cache)
        dataset.x = rows_in_shape(dataset.x, model.input_shape)
    if args.data is not None:
        recorded = (model.metadata.get("data") or {}).get("normalised_scale")
        _warn_if_other_units(prepared, args.data, recorded)
    metrics = evaluate(model, prepared)
    training = model.metadata.get("training")
    # settings a resume changed (--allow-changes): the run is not one of its settings
    changes = (model.metadata.get("metrics") or {}).get("training_changes") or []
    if args.json:
        print(json.dumps({**metrics, "training": training, "training_changes": changes}, indent=2))
        return 0
    name = model.metadata["model"]
    print(
        f"{name} ({args.model_dir}) on {prepared.record['source']}, test split of "
        f"{metrics['test_rows']} rows, code size {model.latent_dim}"
    )
    pca = metrics["pca_test_mse"]

    def vs_pca(mse: float) -> str:
        return format_ratio(None if metrics["ratio_to_pca"] is None else mse / pca)

    rows = [
        (name, f"{metrics['test_mse']:.6g}", vs_pca(metrics["test_mse"])),
        (_pca_label(model), f"{pca:.6g}", vs_pca(pca)),
    ]
    for label, mse in (metrics.get("baselines") or {}).items():
        rows.append((label, f"{mse:.6g}", vs_pca(mse)))
    print_table(["model", "test MSE", "vs PCA"], rows)
    skip = {"test_mse", "pca_test_mse", "ratio_to_pca", "test_rows", "baselines"}
    for key, value in metrics.items():
        if key not in skip:
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if training is not None:
        defaults = TrainConfig().for_model(model).to_dict()  # with the model's own lr
        changed = [f"{k}={v}" for k, v in training.items() if defaults.get(k) != v]
        print(f"trained with: {', '.join(changed) or 'the default settings'}")
    for change in changes:
        print(
            f"changed on resume after epoch {change['epoch']}: {listed_changes(change['changed'])}"
        )
    return 0


def _warn_if_other_units(prepared, source: str, trained_scale: float | None) -> None:
    """Other data through the saved normalisation is as large as the training rows were
    when it is in their units; pixels in [0, 1] for a model of 0..255, say, would be a
    few thousandths of it, and the ratio to PCA would mean nothing."""
    from aecore.data.prepare import normalised_scale

    scale = normalised_scale(prepared, "test")
    if not trained_scale or not scale or 0.01 <= scale / trained_scale <= 100:
        return  # (a folder saved before the training rows' scale was recorded: no guess)
    warn(
        f"{source}: normalised as the training data was ({prepared.normalization.kind}), its "
        f"rows have a root mean square of {scale:.3g}, where the training rows' was "
        f"{trained_scale:.3g}: is it in other units (pixels in [0, 1] for a model of 0..255)?",
        UserWarning,
    )


def _pca_label(model) -> str:
    """PCA's row: a code at least as wide as the input (an SAE's dictionary) leaves PCA
    every component, so its error is rounding alone."""
    if model.latent_dim >= model.input_size:
        return f"PCA (all {model.input_size} components: exact)"
    return f"PCA ({model.latent_dim} components)"


class SignalStop(KeyboardInterrupt):
    """A signal that stops the command without a checkpoint: exit 128 + its number."""

    def __init__(self, signum: int, why: str) -> None:
        super().__init__(why)
        self.signum = signum


class GracefulStop:
    """SIGTERM/SIGINT ask the trainer to checkpoint at the next step and stop; a
    second signal interrupts at once."""

    def __init__(self) -> None:
        self.trainer = None
        self.previous: dict[int, Any] = {}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.trainer is None:
            raise SignalStop(signum, f"{name} before training began: nothing to resume")
        if self.trainer.stop_requested is not None:
            raise SignalStop(signum, f"a second {name}: stopped at once, without a checkpoint")
        self.trainer.request_stop(name)
        print(
            f"\n{name} received: stopping at the next step, with a checkpoint once training "
            f"has begun (a model's layer-wise pretraining keeps none; send again to stop at "
            f"once)",
            file=sys.stderr,
        )

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
