"""The ``aecore`` command (also ``python -m aecore``).

Errors print one line on stderr and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

from aecore._version import __version__

EXIT_ERROR = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (with --resume)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value``: values are JSON when they parse as JSON, else strings."""
    from aecore.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. hidden=[256,128]); got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# -- commands ------------------------------------------------------------------------
def cmd_models(args) -> int:
    from aecore.registry import model_entries

    rows = []
    for e in model_entries():
        if e.status != "ok" and not args.all:
            continue
        cls = e.load() if not e.conflict else None
        cls_name = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else e.target
        status = e.status if e.status == "ok" else f"{e.status}: {e.reason}"
        rows.append((e.name, cls_name, f"{e.distribution} {e.version}".strip(), status))
    _table(["name", "class", "distribution", "status"], rows)
    return 0


def cmd_train(args) -> int:
    from aecore.pipeline import format_ratio, train

    hparams = _parse_set(args.set)
    with _graceful_stop() as stopper:
        result = train(
            args.model,
            args.data,
            args.out,
            latent_dim=args.latent_dim,
            hparams=hparams,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            patience=args.patience,
            normalize=args.normalize,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=None if not args.quiet else False,
            checkpoint_every=args.checkpoint_every,
            trainer_hook=stopper.attach,
        )
    m = result.metrics
    if not result.is_main:
        return 0
    print(
        f"saved {args.model} to {args.out}: test MSE {m['test_mse']:.6g} "
        f"(PCA {m['pca_test_mse']:.6g}, ratio {format_ratio(m['ratio_to_pca'])}), "
        f"best epoch {m['best_epoch']} of {m['epochs_run']}"
    )
    return 0


def cmd_eval(args) -> int:
    from aecore.io import load
    from aecore.pipeline import evaluate, format_ratio, prepare_like

    model = load(args.model_dir)
    prepared = prepare_like(model.metadata, args.data)
    metrics = evaluate(model, prepared)
    if args.json:
        print(json.dumps(metrics, indent=2))
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
        (f"PCA ({model.latent_dim} components)", f"{pca:.6g}", vs_pca(pca)),
    ]
    for label, mse in (metrics.get("baselines") or {}).items():
        rows.append((label, f"{mse:.6g}", vs_pca(mse)))
    _table(["model", "test MSE", "vs PCA"], rows)
    skip = {"test_mse", "pca_test_mse", "ratio_to_pca", "test_rows", "baselines"}
    for key, value in metrics.items():
        if key not in skip:
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    print(f"aecore {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: not available")
    try:
        from aecore.ops import backend_report
    except ImportError as exc:
        print(f"kernels: aecore.ops unavailable ({exc})")
        return 0
    print("kernels:")
    _table(["op", "device", "implementation"], backend_report())
    return 0


def cmd_demo(args) -> int:
    from aecore import demo

    models = args.models.split(",") if args.models else None
    demo.run(args.out, models, seed=args.seed, progress=None if not args.quiet else False)
    return 0


def cmd_bench(args) -> int:
    if args.what == "kernels":
        from aecore.bench_kernels import main as bench_main
    else:
        from aecore.bench_onnx import main as bench_main
    return bench_main(args.rest)


# -- plumbing ------------------------------------------------------------------------
class _graceful_stop:
    """SIGTERM/SIGINT ask the trainer to checkpoint at the next step and stop; a
    second signal interrupts at once."""

    def __init__(self) -> None:
        self.trainer = None
        self.previous: dict[int, Any] = {}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def _handle(self, signum, frame) -> None:
        if self.trainer is None or self.trainer.stop_requested is not None:
            raise KeyboardInterrupt
        self.trainer.stop_requested = signal.Signals(signum).name
        print(
            f"\n{signal.Signals(signum).name} received: checkpointing at the next step "
            f"(send again to stop at once)",
            file=sys.stderr,
        )

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    from aecore.params import integer

    torch.set_num_threads(integer("--threads", threads, low=1))


def _table(header: list[str], rows: list[tuple]) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore", description="Plugin-based autoencoders for PyTorch")
    p.add_argument("--version", action="version", version=f"aecore {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list registered models")
    s.add_argument("--all", action="store_true", help="include broken plugins and why")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("train", help="train a model on a data source and save it")
    s.add_argument("model", help="registry name (see `aecore models`)")
    s.add_argument(
        "--data",
        required=True,
        help="digits, digits:image, npy:PATH, npz:PATH[:KEY], csv:PATH, idx:PATH[:LABELS], patches",
    )
    s.add_argument("--out", required=True, help="model folder to write")
    s.add_argument("--latent-dim", type=int, default=8)
    s.add_argument("--epochs", type=int, default=50)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    s.add_argument("--normalize", default="minmax", choices=["minmax", "standardize", "none"])
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model hyperparameter (JSON value), repeatable",
    )
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    s.add_argument("--overwrite", action="store_true", help="replace a run or model in --out")
    s.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS")
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

    s = sub.add_parser("info", help="versions, devices and kernel implementations")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="train every variant with a demo recipe, write a report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--models", default=None, help="comma-separated subset")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="benchmarks: kernels or onnx")
    s.add_argument("what", choices=["kernels", "onnx"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    s.set_defaults(func=cmd_bench)

    from aecore import cli_inference

    cli_inference.add_commands(sub)
    return p


COMMANDS: dict[str, Callable] = {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _set_threads(getattr(args, "threads", None))
        return args.func(args)
    except Exception as exc:
        from aecore.errors import AecoreError, TrainingInterrupted

        if args.debug:
            raise
        if isinstance(exc, TrainingInterrupted):
            print(f"aecore: {exc}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, (AecoreError, OSError)):
            print(f"aecore: error: {exc}", file=sys.stderr)
        else:
            print(
                f"aecore: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                f"for the traceback)",
                file=sys.stderr,
            )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("aecore: interrupted", file=sys.stderr)
        return 130
