"""Export models to ONNX with torch's dynamo exporter, plus the metadata the runtime needs.

``export_onnx(model_or_dir, "model.onnx", part=...)`` writes one self-contained file
per part (weights inside, opset >= 18, a dynamic batch axis named ``batch``):

* ``full``: ``x -> x_hat``, the model's eval forward (``decode(encode(x))``)
* ``encoder``: ``x -> z``
* ``decoder``: ``z -> x_hat``
* ``all``: the three at once: ``model.onnx`` (full) with ``model.encoder.onnx`` and
  ``model.decoder.onnx`` beside it. ``aecore.runtime.OnnxAutoencoder("model.onnx")``
  finds the siblings, so this is the layout to ship. A model whose detector or default
  score is another than the reconstruction error (an RBM's free energy) adds
  ``model.score.onnx`` (``x -> score``) when the model can compute that score
  deterministically (``exportable_score_kinds``), so the runtime's ``score`` and
  detector methods give what the model's do.

Each file's metadata props (``aecore.*``) carry the registry name, config, data
normalisation, input shape, code size, part, aecore version and an export id shared by
the parts of one export; the runtime needs nothing else. A model that cannot be
exported raises ``OnnxExportError`` naming the model and the operation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aecore._version import __version__
from aecore.base import Autoencoder
from aecore.data.normalization import Normalization
from aecore.errors import ConfigError, ModelFileError, OnnxExportError, warn
from aecore.io.atomic import atomic_write
from aecore.io.lock import FileLock
from aecore.io.model_folder import load
from aecore.keywords import checked_keywords
from aecore.onnx.fold_normalization import IN_GRAPH_KEY, fold_normalization
from aecore.onnx.graphs import (
    SIGNATURES,
    check_float32_io,
    check_model,
    check_standard,
    name_batch_axis,
    slice_part,
)
from aecore.onnx.trace import to_onnx
from aecore.registry import name_of
from aecore.runtime.format import (
    DEFAULT_SCORE_KEY,
    FEATURE_NAMES_KEY,
    FORMAT,
    FORMAT_VERSION,
    INPUT_RANGE_KEY,
    INPUTS_CLIPPED_KEY,
    PARTS,
    PASSES_KEY,
    SCORE_KINDS_KEY,
    SCORE_PART,
    SCORES_CHARGED_KEY,
    part_paths,
    score_path,
)

MIN_OPSET = 18
DEFAULT_OPSET = 18


@checked_keywords
def export_onnx(
    model_or_dir: Any,
    path: str | os.PathLike,
    part: str = "full",
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export a model (an ``aecore.Autoencoder`` or a saved model folder) to ``path``.

    ``part`` is ``"full"``, ``"encoder"``, ``"decoder"`` or ``"all"`` (see the module
    docstring). Refuses to replace existing files unless ``overwrite=True``. Returns
    the path written (for ``"all"``, the full graph's), the file to give
    ``aecore.runtime.OnnxAutoencoder``.
    """
    if part not in (*PARTS, "all"):
        raise ConfigError(f"part must be one of full, encoder, decoder, all; got {part!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset must be an int >= {MIN_OPSET}; got {opset!r}")
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise ConfigError(
            f"opset {opset} is newer than this onnx package supports "
            f"({onnx.defs.onnx_opset_version()})"
        )
    path = Path(path)
    if not path.name.endswith(".onnx") or path.name == ".onnx":
        raise ConfigError(f"ONNX file names end in .onnx; got {str(path)!r}")
    # an export of all parts owns the score graph's name too, written or not: a
    # previous export's score graph must not stay beside this one's
    targets = {**part_paths(path), SCORE_PART: score_path(path)} if part == "all" else {part: path}
    for target in targets.values():
        if target.is_dir():
            raise ConfigError(f"cannot write {target}: it is a directory")
        if target.exists() and not overwrite:
            raise ModelFileError(
                f"{target} exists; pass overwrite=True (--overwrite) or choose another name"
            )
    stale = targets.get(SCORE_PART)
    if stale is not None and stale.exists() and not _is_aecore_export(stale):
        # the name an export of all parts owns, but not a file one wrote: not ours to drop
        raise ModelFileError(
            f"{stale} is not an aecore export, and an export of all parts to {path.name} "
            f"writes or removes its score graph there: move it or choose another name"
        )
    model, name = _resolve_model(model_or_dir)
    parts = (part,)
    if part == "all":
        parts = (*PARTS, SCORE_PART) if exported_score_kind(model) else PARTS
    _warn_if_scored_otherwise(model, name, part)
    protos = export_protos(model, name, parts, opset=opset)
    with contextlib.ExitStack() as held:  # one writer per target file
        for target in targets.values():
            held.enter_context(FileLock(target, "export to"))
            if target.exists() and not overwrite:  # written while this export traced
                raise ModelFileError(
                    f"{target} exists; pass overwrite=True (--overwrite) or choose another name"
                )
        for p, proto in protos.items():
            blob = proto.SerializeToString()
            atomic_write(targets[p], lambda f, blob=blob: f.write(blob))
        if part == "all" and SCORE_PART not in protos:
            targets[SCORE_PART].unlink(missing_ok=True)
    return targets["full"] if part == "all" else path


def _warn_if_scored_otherwise(model, name: str, part: str) -> None:
    """An export whose ``score`` would be the reconstruction error while the model's
    detector scores by another kind: served scores would differ from the model's, and the
    runtime's ``predict`` refuses."""
    detector = getattr(model, "detector", None)  # without one, the served kind is named
    kind = getattr(detector, "kind", None)  # by score_kind(), and predict has no threshold
    if part not in ("full", "all") or kind in (None, "reconstruction"):
        return
    if kind not in getattr(model, "exportable_score_kinds", ()):
        why = "it does not compute that deterministically (exportable_score_kinds)"
    elif part == "full":
        why = "a one-file export has no score graph: part='all' (--all) adds it"
    else:
        return
    warn(
        f"{name} scores rows by {kind} (its detector's), and this export serves the reconstruction "
        f"error instead: {why}. Served scores differ from the model's, and predict() refuses",
        UserWarning,
    )


def _is_aecore_export(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all
        return False
    return any(p.key == "aecore.format" and p.value == FORMAT for p in proto.metadata_props)


def exported_score_kind(model) -> str | None:
    """The score an export's score graph computes: the model's detector's kind or, where
    that is the reconstruction error (the full graph gives it) or there is no detector,
    the model's default kind; None (no score graph) unless that kind is another than
    the reconstruction error and the model computes it deterministically."""
    detector = getattr(model, "detector", None)
    exportable = getattr(model, "exportable_score_kinds", ())
    kinds = [getattr(detector, "kind", None), getattr(model, "default_score_kind", None)]
    return next((k for k in kinds if k not in (None, "reconstruction") and k in exportable), None)


def export_protos(model: nn.Module, name: str, parts=PARTS, *, opset: int = DEFAULT_OPSET):
    """The checked ``onnx.ModelProto`` of each part in ``parts``, in memory (no files).
    ``model`` is left as it was (a CPU float32 eval copy is exported)."""
    parts = tuple(parts)
    known = (*PARTS, SCORE_PART)
    if not parts or any(p not in known for p in parts):
        raise ConfigError(f"parts must be a non-empty subset of {known}; got {parts!r}")
    model = _export_copy(model, name)
    metadata = _metadata(model, name)
    score_kind = exported_score_kind(model)
    if SCORE_PART in parts and score_kind is None:
        raise ConfigError(
            f"{name} has no score graph to export: it needs a detector or a default score "
            f"other than the reconstruction error, one of "
            f"{getattr(model, 'exportable_score_kinds', ())}"
        )
    graphs = [p for p in parts if p != SCORE_PART]
    raw = {}
    if len(graphs) == 1:
        raw[graphs[0]] = to_onnx(model, name, graphs[0], opset)
    elif graphs:
        # one trace for all parts, sliced into the three graphs afterwards: tracing
        # dominates the cost and the slices hold exactly what separate exports would
        combined = to_onnx(model, name, "all", opset)
        raw.update({p: slice_part(combined, p) for p in graphs})
    if SCORE_PART in parts:
        raw[SCORE_PART] = to_onnx(model, name, SCORE_PART, opset, score_kind)
        passes = str(getattr(model, "score_passes", {}).get(score_kind, 1))
        metadata = {**metadata, "aecore.score_kind": score_kind, PASSES_KEY: passes}
    # what score() serves by default: the model's own kind where this export computes
    # it, else the reconstruction error every export computes
    default = getattr(model, "default_score_kind", "reconstruction")
    served = default if SCORE_PART in parts and score_kind == default else "reconstruction"
    metadata[DEFAULT_SCORE_KEY] = served
    out = {}
    norm = getattr(model, "normalization", None) or Normalization("none")
    for p, proto in raw.items():
        name_batch_axis(proto)
        check_standard(proto, name, p)
        check_float32_io(proto, name, p)
        folded = fold_normalization(proto, p, norm, model.input_shape)
        del proto.metadata_props[:]
        extra = {IN_GRAPH_KEY: "1"} if folded else {}
        for key, value in {**metadata, **extra, "aecore.part": p}.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"aecore {name} ({p}): {SIGNATURES[p][0]} -> {SIGNATURES[p][1]}"
        check_model(proto, name, p)
        out[p] = proto
    return out


def _resolve_model(model_or_dir: Any) -> tuple[nn.Module, str]:
    if isinstance(model_or_dir, (str, os.PathLike)):
        model = load(model_or_dir)
        return model, model.metadata["model"]
    if isinstance(model_or_dir, Autoencoder):
        return model_or_dir, name_of(model_or_dir)
    raise ConfigError(
        f"export_onnx expects an aecore.Autoencoder or a model folder; "
        f"got {type(model_or_dir).__name__}"
    )


def _export_copy(model: nn.Module, name: str) -> nn.Module:
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # a plugin holding something uncopyable
        raise OnnxExportError(f"cannot export {name}: the model cannot be copied: {exc}") from None
    return clone.to(device="cpu", dtype=torch.float32).eval()


def _metadata(model: nn.Module, name: str) -> dict[str, str]:
    try:
        config = json.dumps(model.get_config(), sort_keys=True)
    except TypeError as exc:
        raise OnnxExportError(
            f"cannot export {name}: {type(model).__name__}.get_config() is not "
            f"JSON-serialisable ({exc}): return plain numbers, strings, lists and dicts"
        ) from None
    norm = getattr(model, "normalization", None) or Normalization("none")
    metadata = {
        "aecore.format": FORMAT,
        "aecore.format_version": str(FORMAT_VERSION),
        "aecore.model": name,
        "aecore.config": config,
        "aecore.normalization": json.dumps(norm.to_dict()),
        "aecore.input_shape": json.dumps(list(model.input_shape)),
        "aecore.latent_dim": str(model.latent_dim),
        "aecore.version": __version__,
        "aecore.torch_version": torch.__version__.split("+")[0],
        SCORE_KINDS_KEY: json.dumps(list(getattr(model, "score_kinds", ("reconstruction",)))),
        **detector_metadata(model),
        **input_range_metadata(model),
    }
    # the export's identity, which the runtime checks a part file's siblings against:
    # the weights and everything the graphs or the runtime take from the metadata (the
    # normalisation is folded into every graph)
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {**metadata, "aecore.export_id": digest.hexdigest()[:20]}


def input_range_metadata(model) -> dict[str, str]:
    """The range of normalised inputs the model takes, when it is bounded (the graphs
    that take rows clip them to it)."""
    bounds = getattr(model, "input_range", None)
    if bounds is None:
        return {}
    return {
        INPUT_RANGE_KEY: json.dumps([float(b) for b in bounds]),
        INPUTS_CLIPPED_KEY: "1",
        SCORES_CHARGED_KEY: "1",
    }


def detector_metadata(model) -> dict[str, str]:
    """The detector threshold saved with the model (``aecore.AnomalyDetector``), if any,
    and the names of the columns it was fitted on."""
    out = {}
    detector = getattr(model, "detector", None)
    if detector is not None:
        out["aecore.detector"] = json.dumps(detector.to_dict())
    names = getattr(model, "feature_names", None)
    if names is not None:
        out[FEATURE_NAMES_KEY] = json.dumps([str(n) for n in names])
    return out
