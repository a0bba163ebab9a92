"""``OnnxAutoencoder``: an exported model run by onnxruntime (numpy in, numpy out)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aecore.data.normalization import Normalization
from aecore.detection import ScoreThreshold
from aecore.errors import ConfigError, DataError, ModelFileError
from aecore.runtime.arrays import ArrayModel
from aecore.runtime.format import (
    DEFAULT_BATCH_SIZE,
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

_FLOAT32 = np.dtype(np.float32)


class _Graph:
    """One onnxruntime session with its single input and output name."""

    __slots__ = ("input", "output", "path", "run", "session")

    def __init__(self, session, path: Path) -> None:
        self.session = session
        self.path = path
        self.input = session.get_inputs()[0].name
        self.output = [session.get_outputs()[0].name]
        self.run = session.run


class OnnxAutoencoder(ArrayModel):
    """An exported aecore model run by onnxruntime (see the module docstring).

    ``path``: ``model.onnx`` (or any part file of an export). ``providers``: onnxruntime
    execution providers, default ``["CPUExecutionProvider"]``. ``threads``: intra-op
    threads (default: onnxruntime's choice, all cores).

    Attributes: ``name`` (registry name), ``config``, ``input_shape``, ``latent_dim``,
    ``normalization``, ``parts`` (the graphs found), ``metadata`` (all ``aecore.*`` props).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("aecore.runtime needs onnxruntime: pip install onnxruntime") from None
        self._ort = onnxruntime
        self.path = Path(path)
        self.providers = _check_providers(onnxruntime, providers)
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ConfigError(f"threads must be a positive int or None; got {threads!r}")
        self.threads = threads
        graph, meta = self._open(self.path)
        self.metadata = meta
        self.part = meta["aecore.part"]
        if self.part == SCORE_PART:
            raise ModelFileError(
                f"{self.path} is the score graph of an export: open its full graph, "
                f"{part_paths(self.path)['full']}"
            )
        self.name = meta["aecore.model"]
        self.config = _json_field(meta, "aecore.config", self.path)
        shape = _json_field(meta, "aecore.input_shape", self.path)
        if not (
            isinstance(shape, list)
            and shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ModelFileError(f"{self.path}: malformed aecore.input_shape {shape!r}")
        self.input_shape = tuple(shape)
        self.latent_dim = int(meta["aecore.latent_dim"])
        try:
            norm = Normalization.from_dict(_json_field(meta, "aecore.normalization", self.path))
        except ValueError as exc:
            raise ModelFileError(f"{self.path}: malformed aecore.normalization: {exc}") from None
        _check_signature(graph, self.part, self.input_shape, self.latent_dim)
        try:
            self.normalization = norm
        except ConfigError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from None
        if "aecore.detector" in meta:
            try:
                self.detector = ScoreThreshold.from_dict(
                    _json_field(meta, "aecore.detector", self.path)
                )
            except DataError as exc:
                raise ModelFileError(f"{self.path}: {exc}") from None
        if INPUT_RANGE_KEY in meta:
            bounds = _json_field(meta, INPUT_RANGE_KEY, self.path)
            if not (
                isinstance(bounds, list)
                and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                and bounds[0] <= bounds[1]
            ):
                raise ModelFileError(f"{self.path}: malformed {INPUT_RANGE_KEY} {bounds!r}")
            self.input_range = (float(bounds[0]), float(bounds[1]))
        self.default_score_kind = meta.get(DEFAULT_SCORE_KEY, "reconstruction")
        # the model's kinds (None for an export from before they were recorded)
        self.score_kinds = (
            _json_field(meta, SCORE_KINDS_KEY, self.path) if SCORE_KINDS_KEY in meta else None
        )
        if FEATURE_NAMES_KEY in meta:
            names = _json_field(meta, FEATURE_NAMES_KEY, self.path)
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ModelFileError(f"{self.path}: malformed {FEATURE_NAMES_KEY}")
            self.feature_names = names
        self.normalizes_itself = meta.get("aecore.normalization_in_graph") == "1"
        # the graphs hold that normalisation: another one could not take effect
        self._normalization_fixed = self.normalizes_itself
        self.export_id = meta.get("aecore.export_id", "")
        self.aecore_version = meta.get("aecore.version", "")
        self._graphs: dict[str, _Graph | None] = {self.part: graph}
        # siblings by name; a part file named otherwise (e.g. enc.onnx) stands alone
        self._paths: dict[str, Path | None] = {
            p: (None if q == self.path else q) for p, q in part_paths(self.path).items()
        }
        self._paths[self.part] = self.path
        self._paths[SCORE_PART] = score_path(self.path)
        # the full graph's session call, when inputs go in as they are (data units,
        # clipped by the graph if need be; older exports left that to the runtime)
        self._serve = None
        takes_data_units = self.normalizes_itself or norm.kind == "none"
        self.graphs_clip = meta.get(INPUTS_CLIPPED_KEY) == "1"
        self.scores_charged = meta.get(SCORES_CHARGED_KEY) == "1" or self.input_range is None
        clips = self.input_range is None or self.graphs_clip
        if self.part == "full" and takes_data_units and clips:
            self._serve = (graph.run, graph.output, graph.input)

    def __getstate__(self) -> dict[str, Any]:
        # sessions do not pickle: a copy (another process, say) reopens the same files
        return {"path": self.path, "providers": self.providers, "threads": self.threads,
                "export_id": self.export_id}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["providers"], state["threads"])
        if self.export_id != state["export_id"]:
            raise ModelFileError(
                f"{self.path} holds another export (id {self.export_id!r}) than the one "
                f"pickled (id {state['export_id']!r}): open the file again"
            )

    def _computes(self, kind: str) -> bool:
        return kind == "reconstruction" or self._exported_score_kind() == kind

    def _exported_score_kind(self) -> str | None:
        """The kind the export's score graph computes; None without one."""
        graph = self._graph(SCORE_PART)
        if graph is None:
            return None
        return graph.session.get_modelmeta().custom_metadata_map.get("aecore.score_kind")

    def _kind_scores(self, X: Any, kind: str, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        graph = self._graph(SCORE_PART)
        full = part_paths(self.path)["full"]
        if graph is None:
            thresholded = self.detector is not None and self.detector.kind == kind
            if thresholded and self._graph("encoder") is not None:
                # an export of all parts writes its detector's kind where the model can
                raise DataError(
                    f"scoring by {kind!r} needs a score graph, and this export of all parts "
                    f"has none: the model does not compute {kind!r} deterministically (its "
                    f"exportable_score_kinds); serve the model folder (torch)"
                )
            raise DataError(
                f"scoring by {kind!r} needs the export's score graph "
                f"({score_path(self.path)}), which this export lacks: an export of all "
                f"parts (`aecore export MODEL_DIR --out {full} --all`, or "
                f"export_onnx(..., part='all')) writes one for the kind of the model's "
                f"detector (aecore.AnomalyDetector(score_kind={kind!r}) fits one) or else "
                f"of its default kind, where the model computes it deterministically; or "
                f"serve the model folder (torch)"
                + ("" if thresholded else ", or pass kind='reconstruction'")
            )
        exported = self._exported_score_kind()
        if exported != kind:
            raise DataError(
                f"{graph.path} computes the score {exported!r}, not {kind!r}: pass "
                f"kind={exported!r} or kind='reconstruction', or serve the model folder (torch)"
            )
        x = self._check_inputs(X)
        # a score of several passes per row (a VAE's draws) in proportionally
        # smaller batches
        passes = int(graph.session.get_modelmeta().custom_metadata_map.get(PASSES_KEY, "1"))
        batch = max(1, batch_size // max(passes, 1))
        scores = self._map(SCORE_PART, x, (), batch, inputs=True)
        return scores.astype(np.float64)

    def reconstruct(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """``decode(encode(x))`` in data units (see ``ArrayModel.reconstruct``)."""
        fast = self._serve
        if (  # the serving hot path: one float32 batch into a graph that takes data units
            fast is not None
            and type(x) is np.ndarray
            and x.dtype is _FLOAT32
            and x.shape[1:] == self.input_shape
            and 0 < x.shape[0] <= batch_size
        ):
            return fast[0](fast[1], {fast[2]: x})[0]
        return super().reconstruct(x, batch_size=batch_size)

    def __repr__(self) -> str:
        return (
            f"OnnxAutoencoder({str(self.path)!r}: {self.name}, input_shape={self.input_shape}, "
            f"latent_dim={self.latent_dim}, parts={self.parts})"
        )

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts available: the loaded file and siblings present on disk."""
        return tuple(
            p
            for p in PARTS
            if self._graphs.get(p) is not None
            or (p not in self._graphs and self._paths[p] is not None and self._paths[p].is_file())
        )

    # -- sessions -----------------------------------------------------------------------
    def _open(self, path: Path):
        if not path.is_file():
            raise ModelFileError(
                f"{path}: {'is a directory' if path.is_dir() else 'file not found'}"
            )
        options = self._ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        try:
            session = self._ort.InferenceSession(
                str(path), sess_options=options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            text = str(exc).split(":", 3)[-1].strip() or type(exc).__name__
            raise ModelFileError(
                f"{path} is not a readable ONNX model (corrupt or truncated?): {text}"
            ) from None
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if meta.get("aecore.format") != FORMAT:
            raise ModelFileError(
                f"{path} is an ONNX model but not an aecore export (no aecore metadata); "
                f"export one with `aecore export MODEL_DIR --out FILE.onnx --all`"
            )
        try:
            version = int(meta.get("aecore.format_version", "0"))
        except ValueError:
            version = -1
        if version > FORMAT_VERSION or version < 1:
            raise ModelFileError(
                f"{path}: aecore ONNX format version {meta.get('aecore.format_version')!r} "
                f"is not supported (this aecore reads version {FORMAT_VERSION}); "
                f"upgrade aecore or re-export"
            )
        for key in ("aecore.part", "aecore.model", "aecore.input_shape", "aecore.latent_dim"):
            if key not in meta:
                raise ModelFileError(f"{path}: aecore metadata lacks {key!r}")
        if meta["aecore.part"] not in (*PARTS, SCORE_PART):
            raise ModelFileError(f"{path}: unknown part {meta['aecore.part']!r}")
        if not meta["aecore.latent_dim"].isdigit():
            raise ModelFileError(f"{path}: malformed aecore.latent_dim")
        return _Graph(session, path), meta

    def _graph(self, part: str) -> _Graph | None:
        if part in self._graphs:
            return self._graphs[part]
        path = self._paths[part]
        graph = None
        if path is not None and path.is_file():
            graph, meta = self._open(path)
            if meta.get("aecore.export_id") != self.export_id or meta["aecore.part"] != part:
                raise ModelFileError(
                    f"{path} does not belong to {self.path} (another export or another "
                    f"part); re-export with `aecore export MODEL_DIR --out {self.path} --all`"
                )
            _check_signature(graph, part, self.input_shape, self.latent_dim)
        self._graphs[part] = graph
        return graph

    def _missing(self, part: str, method: str) -> ModelFileError:
        expected = part_paths(self.path)
        return ModelFileError(
            f"{method} needs the {part} graph, {expected[part]}, which is not there "
            f"({self.path} holds the {self.part} part); export all parts with "
            f"`aecore export MODEL_DIR --out {expected['full']} --all`"
        )

    def _forward(self, part: str, batch: np.ndarray) -> np.ndarray:
        graph = self._graphs.get(part) or self._graph(part)
        if graph is not None:
            return graph.run(graph.output, {graph.input: batch})[0]
        if part == "full":  # no full graph: chain the two halves
            return self._forward("decoder", self._forward("encoder", batch))
        raise self._missing(part, "encode" if part == "encoder" else "decode")


def _check_providers(ort, providers) -> list[str]:
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
        raise ConfigError(
            f"providers must be a list of provider names such as ['CPUExecutionProvider']; "
            f"got {providers!r}"
        )
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise ConfigError(
            f"onnxruntime providers {unknown or providers} are not available here "
            f"(available: {', '.join(available)})"
        )
    return list(providers)


def _json_field(meta: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise ModelFileError(f"{path}: aecore metadata lacks {key!r}") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: aecore metadata {key!r} is not valid JSON: {exc}") from None


def _check_signature(graph: _Graph, part: str, input_shape, latent_dim) -> None:
    """The graph's input and output shapes agree with its metadata."""
    expected_in = input_shape if part != "decoder" else (latent_dim,)
    expected_out = {"encoder": (latent_dim,), SCORE_PART: ()}.get(part, input_shape)
    for kind, spec, expected in (
        ("input", graph.session.get_inputs(), expected_in),
        ("output", graph.session.get_outputs(), expected_out),
    ):
        if len(spec) != 1:
            raise ModelFileError(f"{graph.path}: expected one graph {kind}; found {len(spec)}")
        dims = tuple(spec[0].shape[1:])
        if len(spec[0].shape) != len(expected) + 1 or any(
            isinstance(d, int) and d != e for d, e in zip(dims, expected)
        ):
            raise ModelFileError(
                f"{graph.path}: the {part} graph's {kind} has shape {tuple(spec[0].shape)}, "
                f"its metadata says (batch, {', '.join(map(str, expected))})"
            )
        if spec[0].type != "tensor(float)":
            raise ModelFileError(
                f"{graph.path}: the {part} graph's {kind} is {spec[0].type}, expected float32"
            )
