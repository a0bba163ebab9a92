"""The layout of an aecore ONNX export: one file per part, named after the full graph's
file, with ``aecore.*`` metadata props. The exporter (``aecore.onnx``) writes what the
runtime reads."""

from __future__ import annotations

import os
from pathlib import Path

FORMAT = "aecore-onnx"  # written by aecore.onnx, read by this package
FORMAT_VERSION = 1
PARTS = ("full", "encoder", "decoder")
#: the graph an export of all parts adds when the model's detector thresholds a score
#: other than the reconstruction error (``x -> score``, one per row)
SCORE_PART = "score"
#: the score graph's forward passes per row (its metadata; 1 where absent)
PASSES_KEY = "aecore.score_passes"
#: the range a model with bounded inputs takes, in normalised units (JSON ``[lo, hi]``;
#: absent for any real values): rows are clipped to it, scores charge what lies beyond
INPUT_RANGE_KEY = "aecore.input_range"
#: "1" when the graphs that take rows clip them to the input range themselves
INPUTS_CLIPPED_KEY = "aecore.inputs_clipped"
#: "1" when scores charge rows for their distance beyond the input range (an export
#: without it scores rows as their clipped selves, as it always did)
SCORES_CHARGED_KEY = "aecore.scores_charged"
#: the kind ``score`` gives by default, as the model's ``Autoencoder.score`` does (absent:
#: the reconstruction error, which exports before this key always gave)
DEFAULT_SCORE_KEY = "aecore.default_score_kind"
#: every kind the model scores by (``Autoencoder.score_kinds``); an export computes the
#: reconstruction error and at most one other (its score graph's)
SCORE_KINDS_KEY = "aecore.score_kinds"
#: the columns (a DataFrame's) a scikit-learn estimator fitted the model on: served rows
#: given as a DataFrame must have them, in that order
FEATURE_NAMES_KEY = "aecore.feature_names"
#: rows per onnxruntime call: bounds memory for large (memory-mapped) inputs
DEFAULT_BATCH_SIZE = 4096


def part_paths(path: str | os.PathLike) -> dict[str, Path]:
    """``m.onnx`` / ``m.encoder.onnx`` / ``m.decoder.onnx`` for any of them (or of
    ``m.score.onnx``)."""
    path = Path(path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    for part in ("encoder", "decoder", SCORE_PART):
        if stem.endswith(f".{part}"):
            stem = stem[: -len(part) - 1]
    return {
        "full": path.with_name(f"{stem}.onnx"),
        "encoder": path.with_name(f"{stem}.encoder.onnx"),
        "decoder": path.with_name(f"{stem}.decoder.onnx"),
    }


def score_path(path: str | os.PathLike) -> Path:
    """``m.score.onnx``, the score graph beside any part file of an export."""
    full = part_paths(path)["full"]
    return full.with_name(f"{full.name[: -len('.onnx')]}.{SCORE_PART}.onnx")
