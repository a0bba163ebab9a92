"""``aecore encode | decode | reconstruct | score | predict | export``: apply or export a
model.

MODEL is a model folder (run by PyTorch) or an ``.onnx`` file (run by onnxruntime,
through ``aecore.runtime``; that path never imports torch, so these commands work in
an environment with only numpy and onnxruntime). Both paths compute the same thing:
inputs in data units are normalised with the stored normalisation, outputs of
``reconstruct`` / ``decode`` are inverted back to data units, and ``score`` is the
model's anomaly score per row (``--kind``; by default its detector's kind, else the
model's own, e.g. an RBM's free energy, where the model computes it; ``reconstruction``
is the mean squared error in normalised units; the output line names the kind), and
``predict`` applies the detector saved with the model (``aecore.AnomalyDetector``):
labels, 1 for outliers, with ``--proba`` and ``--confidence`` columns on request.

Inputs: ``.npy`` (memory-mapped) or ``.csv`` (numeric, optional header), one row per
sample; rows of ``prod(input_shape)`` values are reshaped for image models, and images
flattened for vector models. Outputs: ``.npy`` (``(N, ...)`` arrays) or ``.csv`` (one row
per sample, flattened), chosen by extension; an existing output is only replaced with
``--overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aecore.data.dataset import as_dataset, rows_in_shape
from aecore.data.files import csv_header, read_csv
from aecore.data.sources import load_data
from aecore.detection import PROBA_METHODS
from aecore.errors import ConfigError, DataError
from aecore.io.atomic import atomic_write
from aecore.runtime import DEFAULT_BATCH_SIZE, OnnxAutoencoder, part_paths, score_path
from aecore.runtime.arrays import check_columns
from aecore.serving import open_model

OUTPUT_SUFFIXES = (".npy", ".csv")

_COMMANDS = {
    "encode": ("codes (N, latent_dim) of inputs", "inputs"),
    "decode": ("inputs, in data units, decoded from codes (N, latent_dim)", "codes"),
    "reconstruct": ("reconstructions of inputs, in data units", "inputs"),
    "score": ("anomaly score per row (its detector's or default kind, or --kind)", "inputs"),
    "predict": ("outlier labels per row (1 = outlier) by the model's detector", "inputs"),
}


def add_commands(sub) -> None:
    """Add the inference and export commands to ``aecore``'s subparsers."""
    for command, (what, takes) in _COMMANDS.items():
        s = sub.add_parser(command, help=what, description=f"Write {what}.")
        s.add_argument("model", help="model folder (PyTorch) or .onnx file (onnxruntime)")
        s.add_argument("--input", required=True, help=f"{takes}: .npy or .csv, one row each")
        s.add_argument("--output", required=True, help=".npy or .csv (by extension)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if command != "predict":
            s.add_argument(
                "--batch-size",
                type=int,
                default=DEFAULT_BATCH_SIZE,
                help=f"rows per model call (default {DEFAULT_BATCH_SIZE})",
            )
        else:
            s.add_argument(
                "--proba",
                choices=PROBA_METHODS,
                help="add a column: the outlier probability by this method",
            )
            s.add_argument(
                "--confidence", action="store_true", help="add a column: the label's confidence"
            )
        if command == "score":
            s.add_argument(
                "--kind",
                help="the score: reconstruction (mean squared error, normalised units) or "
                "another of the model's kinds (default: its detector's kind, else the model's "
                "own, where the model computes it; the output line names it)",
            )
        s.set_defaults(func=cmd_apply, action=command)

    s = sub.add_parser(
        "export",
        help="export a saved model to ONNX (or an SAE to SAELens or sparsify)",
        description=(
            "Export a model folder to ONNX. --all writes FILE (full model) with "
            "FILE's stem.encoder.onnx and .decoder.onnx beside it: the layout "
            "aecore.runtime.OnnxAutoencoder and `aecore encode FILE` use. "
            "--format saelens or sparsify writes an SAE as that library's folder."
        ),
    )
    s.add_argument("model_dir", help="model folder written by `aecore train`")
    s.add_argument(
        "--out", required=True, help="ONNX file to write (ends in .onnx), or the SAE folder"
    )
    s.add_argument(
        "--format",
        choices=["onnx", "saelens", "sparsify"],
        default="onnx",
        help="onnx (default), or an SAE folder for SAELens or sparsify",
    )
    s.add_argument(
        "--hook-name",
        help="SAELens: the hook point the SAE reads (metadata; default: the hook of "
        "the activation cache it trained on, or of the SAELens folder it was imported from)",
    )
    which = s.add_mutually_exclusive_group()
    which.add_argument(
        "--part", choices=["full", "encoder", "decoder"], default="full", help="default: full"
    )
    which.add_argument("--all", action="store_true", help="write all three parts")
    s.add_argument("--opset", type=int, help="ONNX opset (>= 18, default 18)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=cmd_export)


# -- commands ------------------------------------------------------------------------
def cmd_apply(args) -> int:
    out_path = Path(args.output)
    if not Path(args.input).expanduser().is_file():  # before the output's checks: the cause
        what = "a directory" if Path(args.input).expanduser().is_dir() else "not found"
        raise DataError(f"--input {args.input}: {what}; expected a .npy or .csv file")
    check_output(out_path, args.overwrite)
    if out_path.exists() and out_path.resolve() == Path(args.input).resolve():
        raise DataError(f"--output {out_path} is the --input file: write the results elsewhere")
    model = open_model(args.model)
    # the columns a model was fitted on: a CSV header naming them (numbers too, such as
    # wavelengths) is a header, and one naming others is refused (columns go by position)
    names = getattr(model, "feature_names", None) if args.action != "decode" else None
    data = read_rows(Path(args.input), names)
    if args.action == "decode":
        result = model.decode(data, batch_size=args.batch_size)
    else:
        is_csv = Path(args.input).suffix.lower() == ".csv"
        header = csv_header(args.input, names) if is_csv else None
        if names is not None and header is not None:
            check_columns(header, names)
        rows = rows_in_shape(data, model.input_shape)
        if args.action == "predict":
            result = predictions(model, rows, args.proba, args.confidence)
        else:
            kind = {"kind": args.kind} if args.action == "score" else {}
            result = getattr(model, args.action)(rows, batch_size=args.batch_size, **kind)
    write_array(out_path, result, overwrite=args.overwrite)
    backend = "onnxruntime" if isinstance(model, OnnxAutoencoder) else "torch"
    # which score: a one-file export of an RBM detector gives the reconstruction error,
    # not the free energy its threshold is in
    what = f"score ({model.score_kind(args.kind)})" if args.action == "score" else args.action
    print(
        f"{what}: {len(result)} rows of {args.input} through {model.name} "
        f"({backend}) -> {out_path} {tuple(result.shape)}"
    )
    if args.action == "predict":
        labels = result if result.ndim == 1 else result[:, 0]
        detector = model.detector
        print(
            f"{int(labels.sum())} outliers: {detector.kind} score above {detector.threshold:.6g} "
            f"(contamination {detector.contamination:g})"
        )
    return 0


def predictions(model, rows, proba: str | None, confidence: bool) -> np.ndarray:
    """The detector's labels (N,) or, with extra columns, (N, 1 + extras): label, outlier
    probability, confidence; each row scored once."""
    threshold = model.detector
    if threshold is None:
        raise DataError(
            f"{model.name} was saved without a detector threshold: `aecore score` gives its "
            f"raw anomaly scores; `aecore train ... --contamination 0.1` fits a threshold, "
            f"as aecore.AnomalyDetector does (save its model_)"
        )
    scores = model.decision_function(rows)
    columns = [threshold.labels(scores)]
    if proba is not None:
        columns.append(threshold.proba(scores, proba)[:, 1])
    if confidence:
        columns.append(threshold.confidence(scores))
    return columns[0] if len(columns) == 1 else np.column_stack(columns).astype(np.float64)


def cmd_export(args) -> int:
    if args.format != "onnx":
        from aecore.cli.interchange import cmd_export_folder

        return cmd_export_folder(args)
    from aecore.onnx import export_onnx

    if getattr(args, "hook_name", None) is not None:
        raise ConfigError("--hook-name applies to --format saelens only; got --format onnx")
    part = "all" if args.all else args.part
    opset = 18 if args.opset is None else args.opset
    path = export_onnx(args.model_dir, args.out, part, opset=opset, overwrite=args.overwrite)
    written = [path]
    if part == "all":  # the three graphs and, for some detectors, the score graph
        written = [p for p in (*part_paths(path).values(), score_path(path)) if p.exists()]
    for p in written:
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.1f} KiB)")
    return 0


# -- models ----------------------------------------------------------------------------
# -- files -----------------------------------------------------------------------------
def read_rows(path: Path, names: list[str] | None = None) -> np.ndarray:
    """An .npy or .csv file of rows, checked for numeric, finite values (a CSV's first
    row equal to ``names`` is its header)."""
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise DataError(f"--input {path}: expected a .npy or .csv file")
    if suffix == ".csv" and names is not None:
        return as_dataset(read_csv(str(path), names), source=f"csv:{path}").x
    return load_data(f"{suffix[1:]}:{path}").x


def check_output(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"--output {path}: expected a file name ending in .npy or .csv")
    if path.is_dir():
        raise DataError(f"--output {path} is a directory")
    if path.exists() and not overwrite:
        raise DataError(f"--output {path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise DataError(f"--output {path}: directory {path.parent} does not exist")


def write_array(path: Path, array: np.ndarray, *, overwrite: bool = False) -> None:
    """Write ``array`` as .npy or .csv (rows flattened), atomically: readers never see
    a half-written file and a failed write leaves any previous file intact."""
    check_output(path, overwrite)

    def write(f) -> None:
        if path.suffix.lower() == ".npy":
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        else:
            np.savetxt(f, array.reshape(len(array), -1), delimiter=",", fmt="%.9g")

    atomic_write(path, write)
