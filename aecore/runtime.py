"""Run exported models with onnxruntime: numpy in, numpy out, no torch needed.

Needs only ``numpy`` and ``onnxruntime`` (``pip install aecore[runtime]``); importing
this module never imports torch. Export with ``aecore export DIR --out model.onnx --all``
(or ``aecore.export_onnx(model, "model.onnx", part="all")``), then::

    from aecore.runtime import OnnxAutoencoder
    ae = OnnxAutoencoder("model.onnx")
    z = ae.encode(x)               # codes, (N, latent_dim)
    x_hat = ae.reconstruct(x)      # data units, like x
    s = ae.score(x)                # anomaly score per row, (N,)

Units: ``encode``, ``reconstruct`` and ``score`` take data in the units the model was
trained on (raw features, e.g. pixel values 0..16); the normalisation stored in the
file is applied first, exactly as in training. ``reconstruct`` and ``decode`` return
data units (the normalisation inverted). ``score`` is the mean squared reconstruction
error per row *in normalised units*, i.e. ``Autoencoder.score`` of the model on
normalised inputs, so features count equally whatever their raw scale.

``model.onnx`` (the full graph) serves ``reconstruct`` and ``score``; ``encode`` and
``decode`` use ``model.encoder.onnx`` and ``model.decoder.onnx`` beside it, which
``--all`` writes. Any one of the three files may be given: the others are found by
name and must come from the same export. Without the full graph, ``reconstruct``
chains encoder and decoder.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aecore.errors import ConfigError, DataError, ModelFileError, ShapeError
from aecore.normalization import Normalization

FORMAT = "aecore-onnx"  # aecore.onnx_export writes what this module reads
FORMAT_VERSION = 1
PARTS = ("full", "encoder", "decoder")
#: rows per onnxruntime call: bounds memory for large (memory-mapped) inputs
DEFAULT_BATCH_SIZE = 4096


def part_paths(path: str | os.PathLike) -> dict[str, Path]:
    """``m.onnx`` / ``m.encoder.onnx`` / ``m.decoder.onnx`` for any of the three."""
    path = Path(path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    for part in ("encoder", "decoder"):
        if stem.endswith(f".{part}"):
            stem = stem[: -len(part) - 1]
    return {
        "full": path.with_name(f"{stem}.onnx"),
        "encoder": path.with_name(f"{stem}.encoder.onnx"),
        "decoder": path.with_name(f"{stem}.decoder.onnx"),
    }


class _Graph:
    """One onnxruntime session with its single input and output name."""

    __slots__ = ("input", "output", "path", "run", "session")

    def __init__(self, session, path: Path) -> None:
        self.session = session
        self.path = path
        self.input = session.get_inputs()[0].name
        self.output = [session.get_outputs()[0].name]
        self.run = session.run


class _ArrayModel(abc.ABC):
    """numpy front end shared by the ONNX runtime and ``aecore``'s PyTorch CLI path:
    input checks, normalisation, batching. Subclasses set ``name``, ``input_shape``,
    ``latent_dim`` and ``normalization``, and implement ``_forward``."""

    name: str
    input_shape: tuple[int, ...]
    latent_dim: int

    @abc.abstractmethod
    def _forward(self, part: str, batch: np.ndarray) -> np.ndarray:
        """Run one part on a float32 batch (normalised units)."""

    @property
    def normalization(self) -> Normalization:
        """The data normalisation stored with the model (a ``Normalization``)."""
        return self._normalization

    @normalization.setter
    def normalization(self, norm: Normalization) -> None:
        if not isinstance(norm, Normalization):
            raise ConfigError(f"normalization must be a Normalization; got {norm!r}")
        self._normalization = norm
        # float32 copies of its parameters for the hot path (float32 inputs, outputs);
        # other dtypes go through Normalization.apply, which computes in float64
        self._shift = self._scale = self._inv = None
        self._shifted = False  # a zero shift (min-max of non-negative data) saves a pass
        if norm.kind != "none":
            shift, scale = norm.shift, norm.scale
            if shift.size != 1 and shift.size != int(np.prod(self.input_shape)):
                raise ConfigError(
                    f"the normalisation has {shift.size} features; the model has "
                    f"{int(np.prod(self.input_shape))}"
                )
            shape = () if shift.size == 1 else self.input_shape
            safe = np.where(scale > 0, scale, 1.0)  # constant features are only shifted
            self._shift = shift.reshape(shape).astype(np.float32)
            self._scale = safe.reshape(shape).astype(np.float32)
            self._inv = (1.0 / safe).reshape(shape).astype(np.float32)
            self._shifted = bool(np.any(self._shift))

    def _apply(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32:
            return self._normalization.apply(x)
        if self._shift is None:
            return x
        if not self._shifted:
            return np.multiply(x, self._inv)
        y = np.subtract(x, self._shift)
        y *= self._inv
        return y

    def _invert(self, y: np.ndarray) -> np.ndarray:
        """Normalised model outputs (a fresh float32 array, changed in place) -> data units."""
        if self._shift is not None:
            y *= self._scale
            if self._shifted:
                y += self._shift
        return y

    # -- public API -------------------------------------------------------------------
    def encode(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Codes ``(N, latent_dim)`` float32 of inputs ``(N, *input_shape)`` in data units."""
        x = self._check_inputs(x)
        return self._map("encoder", x, (self.latent_dim,), batch_size, normalize=True)

    def decode(self, z: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Inputs ``(N, *input_shape)`` in data units decoded from codes ``(N, latent_dim)``."""
        z = self._check_codes(z)
        return self._invert(self._map("decoder", z, self.input_shape, batch_size, normalize=False))

    def reconstruct(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """``decode(encode(x))`` in data units: normalise, run the model, invert."""
        x = self._check_inputs(x)
        return self._invert(self._map("full", x, self.input_shape, batch_size, normalize=True))

    def score(self, x: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Anomaly score per row, ``(N,)`` float32: mean squared reconstruction error in
        normalised units (the model's ``Autoencoder.score`` on normalised inputs)."""
        x = self._check_inputs(x)
        batch_size = _check_batch_size(batch_size)
        n = len(x)
        if 0 < n <= batch_size:
            return self._row_errors(x)
        out = np.empty((n,), dtype=np.float32)
        for start in range(0, n, batch_size):
            out[start : start + batch_size] = self._row_errors(x[start : start + batch_size])
        return out

    def _row_errors(self, x: np.ndarray) -> np.ndarray:
        xn = self._apply(x)
        err = self._forward("full", xn)
        err -= xn
        err = err.reshape(len(err), -1)
        # row sums of squares in one pass (np.mean over axes is several times slower)
        return np.einsum("ij,ij->i", err, err) / err.shape[1]

    # -- helpers ------------------------------------------------------------------------
    def _map(self, part, x, out_shape, batch_size, *, normalize) -> np.ndarray:
        batch_size = _check_batch_size(batch_size)
        n = len(x)
        if n <= batch_size:  # the common case: one call, no copy into an output buffer
            if not n:
                return np.empty((0, *out_shape), np.float32)
            return self._forward(part, self._apply(x) if normalize else x)
        out = np.empty((n, *out_shape), dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = x[start : start + batch_size]
            out[start : start + len(chunk)] = self._forward(
                part, self._apply(chunk) if normalize else chunk
            )
        return out

    def _check_inputs(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray and x.dtype == np.float32 and x.shape[1:] == self.input_shape:
            if x.ndim == len(self.input_shape) + 1:  # the hot path: nothing to convert
                return x
        return _check_array(x, self.input_shape, f"{self.name} expects inputs", "x")

    def _check_codes(self, z: Any) -> np.ndarray:
        z = _check_array(z, (self.latent_dim,), f"{self.name}.decode expects codes", "z")
        return z.astype(np.float32, copy=False)


def _check_array(x: Any, shape: tuple[int, ...], what: str, name: str) -> np.ndarray:
    expected = f"(N, {', '.join(map(str, shape))})"
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise DataError(
                f"{what} as an array of shape {expected}; cannot convert {type(x).__name__}: {exc}"
            ) from None
    if x.dtype.kind not in "fiu":
        raise DataError(
            f"{what} as a float or integer array of shape {expected}; got dtype {x.dtype}"
        )
    if x.shape[1:] != shape or x.ndim != len(shape) + 1:
        hint = ""
        if x.shape == shape:
            hint = f"; for a single sample pass {name}[None]"
        elif x.ndim >= 1 and x.size and int(np.prod(x.shape[1:])) == int(np.prod(shape)):
            hint = f"; reshape to {expected} with {name}.reshape(-1, {', '.join(map(str, shape))})"
        raise ShapeError(f"{what} of shape {expected}; got shape {tuple(x.shape)}{hint}")
    return x


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int; got {batch_size!r}")
    return batch_size


class OnnxAutoencoder(_ArrayModel):
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
            raise ImportError(
                "aecore.runtime needs onnxruntime: pip install onnxruntime (or aecore[runtime])"
            ) from None
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
        self.export_id = meta.get("aecore.export_id", "")
        self.aecore_version = meta.get("aecore.version", "")
        self._graphs: dict[str, _Graph | None] = {self.part: graph}
        # siblings by name; a part file named otherwise (e.g. enc.onnx) stands alone
        self._paths: dict[str, Path | None] = {
            p: (None if q == self.path else q) for p, q in part_paths(self.path).items()
        }
        self._paths[self.part] = self.path

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
        if meta["aecore.part"] not in PARTS:
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
    expected_out = (latent_dim,) if part == "encoder" else input_shape
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
