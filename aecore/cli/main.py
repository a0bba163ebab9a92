"""The ``aecore`` command: the parser (each command module adds its commands), the
small commands (``models``, ``info``, ``bench``) and the error handling: errors print
one line on stderr and exit non-zero; ``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from aecore._version import __version__
from aecore.cli import activations, demo, inference, interchange, train
from aecore.cli.tables import print_table
from aecore.errors import AecoreError, TrainingInterrupted
from aecore.params import integer

EXIT_ERROR = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (with --resume)

#: ``aecore bench WHAT`` -> the benchmark module (installed from benchmarks/)
BENCHMARKS = {
    "activations": "aecore_benchmarks.activations",
    "anomaly": "aecore_benchmarks.anomaly",
    "kernels": "aecore_benchmarks.kernels",
    "onnx": "aecore_benchmarks.runtime",
    "quality": "aecore_benchmarks.quality",
    "sae": "aecore_benchmarks.sae",
    "sae-step": "aecore_benchmarks.sae_step",
}


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
    print_table(["name", "class", "distribution", "status"], rows)
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
    from aecore.ops import backend_report

    print("kernels:")
    print_table(["op", "device", "implementation"], backend_report())
    return 0


def cmd_bench(args) -> int:
    import importlib

    try:
        module = importlib.import_module(BENCHMARKS[args.what])
    except ModuleNotFoundError as exc:
        if exc.name != "aecore_benchmarks":
            raise
        raise AecoreError(
            "the benchmarks are not installed (the aecore_benchmarks package, built from "
            "benchmarks/ with aecore); reinstall aecore from its source tree"
        ) from None
    return module.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore", description="Plugin-based autoencoders for PyTorch")
    p.add_argument("--version", action="version", version=f"aecore {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list registered models")
    s.add_argument("--all", action="store_true", help="include broken plugins and why")
    s.set_defaults(func=cmd_models)

    train.add_commands(sub)

    s = sub.add_parser("info", help="versions, devices and kernel implementations")
    s.set_defaults(func=cmd_info)

    demo.add_commands(sub)

    s = sub.add_parser("bench", help="benchmarks: " + ", ".join(sorted(BENCHMARKS)))
    s.add_argument("what", choices=sorted(BENCHMARKS))
    s.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    s.set_defaults(func=cmd_bench)

    inference.add_commands(sub)
    activations.add_commands(sub)
    interchange.add_commands(sub)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # a command's warnings read like its errors: not a file, a line number and source
    return f"aecore: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug works wherever it is put: errors say "rerun with --debug", and users add
    # it at the end, where the subcommand's parser would refuse it
    debug = "--debug" in argv
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = args.debug or debug  # (--deb, argparse's prefix, sets it too)
    command = _subparser(parser, args)
    for key, value in vars(args).items():
        if isinstance(value, str) and not value.strip():  # an unset shell variable
            command.error(f"{_argument_name(command, key)} is empty: give a path or value")
    if args.debug:
        return _run(args)
    formatting, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = formatting


def _run(args) -> int:
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(integer("--threads", threads, low=1))
        return args.func(args)
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, TrainingInterrupted):
            print(f"aecore: {exc}", file=sys.stderr)
            if exc.saved:
                return EXIT_INTERRUPTED
            # nothing saved to resume (a model's pretraining keeps no checkpoint): the
            # signal's own code, as before training, not the one that says "resume"
            return 128 + getattr(signal.Signals, exc.reason or "", signal.SIGTERM)
        if isinstance(exc, BrokenPipeError):  # the reader closed early (| head): done
            # what is left unflushed goes nowhere, not into an error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        missing = _missing_package(exc)
        if missing:
            print(f"aecore: error: {missing}", file=sys.stderr)
        elif _out_of_memory(exc):
            print(
                f"aecore: error: out of memory ({type(exc).__name__}: {exc}): a smaller "
                f"model, batch size or data set",
                file=sys.stderr,
            )
        elif isinstance(exc, (AecoreError, OSError)):
            print(f"aecore: error: {exc}", file=sys.stderr)
        else:
            print(
                f"aecore: internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                f"for the traceback)",
                file=sys.stderr,
            )
        return EXIT_ERROR
    except KeyboardInterrupt as exc:  # SIGINT's 130 unless a handler names its signal
        signum = getattr(exc, "signum", 2)
        print(f"aecore: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 128 + signum


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` were parsed by: its arguments, its usage."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs and subs[0].dest else None
        if chosen not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[chosen]


def _argument_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """How the command line spells the argument stored as ``dest`` (``--out``)."""
    for action in parser._actions:
        if action.dest == dest:
            return max(action.option_strings, key=len, default=action.metavar or dest)
    return dest


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text)
    )


_PIP_NAMES = {"sklearn": "scikit-learn", "onnxruntime": "onnxruntime", "PIL": "pillow"}


def _missing_package(exc: BaseException) -> str | None:
    """The message for a command that needs a package this environment lacks (a serving
    image without torch, say), or None for any other error."""
    if isinstance(exc, ImportError) and "pip install" in str(exc):
        return str(exc)  # aecore's own word for it
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if not name or name.split(".")[0] in ("aecore", "aecore_plugins", "aecore_benchmarks"):
        return None
    top = name.split(".")[0]
    message = (
        f"this command needs {top}, which is not installed (pip install {_PIP_NAMES.get(top, top)})"
    )
    if top == "torch":
        message += "; without torch, aecore serves exported models: give it a .onnx file"
    return message
