"""Export models to ONNX with torch's dynamo exporter, plus the metadata the runtime needs.

``export_onnx(model_or_dir, "model.onnx", part=...)`` writes one self-contained file
per part (weights inside, opset >= 18, a dynamic batch axis named ``batch``):

* ``full``: ``x -> x_hat``, the model's eval forward (``decode(encode(x))``)
* ``encoder``: ``x -> z``
* ``decoder``: ``z -> x_hat``
* ``all``: the three at once: ``model.onnx`` (full) with ``model.encoder.onnx`` and
  ``model.decoder.onnx`` beside it. ``aecore.runtime.OnnxAutoencoder("model.onnx")``
  finds the siblings, so this is the layout to ship.

Each file's metadata props (``aecore.*``) carry the registry name, config, data
normalisation, input shape, code size, part, aecore version and an export id shared by
the parts of one export; the runtime needs nothing else.

Graphs hold standard, deterministic ONNX ops only (checked on every export). aecore's
fused kernels on inference paths (``torch.ops.aecore.topk_sparsify``) are replaced at
export time by plain-PyTorch equivalents, so a k-sparse code exports as TopK +
ScatterElements; a third-party plugin with its own custom op registers an equivalent
with ``register_export_decomposition``. A model that still cannot be exported raises
``OnnxExportError`` naming the model and the operation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aecore._version import __version__
from aecore.errors import AecoreError, ConfigError, ModelFileError
from aecore.runtime import FORMAT, FORMAT_VERSION, PARTS, part_paths

__all__ = [
    "OnnxExportError",
    "export_onnx",
    "export_protos",
    "part_paths",
    "register_export_decomposition",
]

MIN_OPSET = 18
DEFAULT_OPSET = 18
#: graph input and output names per part
SIGNATURES = {"full": ("x", "x_hat"), "encoder": ("x", "z"), "decoder": ("z", "x_hat")}
BATCH_DIM = "batch"
#: ONNX ops that draw random numbers: an inference graph must not hold any
RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
_STANDARD_DOMAINS = ("", "ai.onnx")

#: extra export-time decompositions: torch op overload -> plain-PyTorch function
_DECOMPOSITIONS: dict[Any, Callable] = {}


class OnnxExportError(AecoreError, RuntimeError):
    """A model cannot be exported to ONNX (the message names the model and the op)."""


def register_export_decomposition(op: Any, fn: Callable) -> None:
    """Export a custom torch op as ``fn``, a plain-PyTorch function with the op's
    positional arguments and results (for plugins that ship their own kernels).

    ``op`` is an ``OpOverload`` such as ``torch.ops.mylib.fused.default`` (an
    ``OpOverloadPacket`` registers all its overloads). The function is traced in the
    op's place, so it must use ops that export (ATen ops, no data-dependent Python
    control flow). aecore registers its own ops itself.
    """
    if not callable(fn):
        raise ConfigError(f"decomposition for {op!r} must be callable; got {fn!r}")
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            _DECOMPOSITIONS[getattr(op, name)] = fn
    elif isinstance(op, torch._ops.OpOverload):
        _DECOMPOSITIONS[op] = fn
    else:
        raise ConfigError(
            f"op must be a torch op such as torch.ops.mylib.fused.default; got {op!r}"
        )


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
    parts = PARTS if part == "all" else (part,)
    targets = part_paths(path) if part == "all" else {part: path}
    for target in targets.values():
        if target.is_dir():
            raise ConfigError(f"cannot write {target}: it is a directory")
        if target.exists() and not overwrite:
            raise ModelFileError(
                f"{target} exists; pass overwrite=True (--overwrite) or choose another name"
            )
    model, name = _resolve_model(model_or_dir)
    protos = export_protos(model, name, parts, opset=opset)
    from aecore.fileio import atomic_write

    for p, proto in protos.items():
        blob = proto.SerializeToString()
        atomic_write(targets[p], lambda f, blob=blob: f.write(blob))
    return targets["full"] if part == "all" else path


def export_protos(model: nn.Module, name: str, parts=PARTS, *, opset: int = DEFAULT_OPSET):
    """The checked ``onnx.ModelProto`` of each part in ``parts``, in memory (no files).
    ``model`` is left as it was (a CPU float32 eval copy is exported)."""
    parts = tuple(parts)
    if not parts or any(p not in PARTS for p in parts):
        raise ConfigError(f"parts must be a non-empty subset of {PARTS}; got {parts!r}")
    model = _export_copy(model, name)
    metadata = _metadata(model, name)
    if len(parts) == 1:
        (only,) = parts
        program = _to_onnx(model, name, only, _PartGraph(model, only), opset)
        raw = {only: program}
    else:
        # one trace for all parts, sliced into the three graphs afterwards: tracing
        # dominates the cost and the slices hold exactly what separate exports would
        combined = _to_onnx(model, name, "all", _AllParts(model), opset)
        raw = {p: _slice(combined, p) for p in parts}
    out = {}
    for p, proto in raw.items():
        _name_batch_axis(proto)
        _check_standard(proto, name, p)
        del proto.metadata_props[:]
        for key, value in {**metadata, "aecore.part": p}.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"aecore {name} ({p}): {SIGNATURES[p][0]} -> {SIGNATURES[p][1]}"
        _check_model(proto, name, p)
        out[p] = proto
    return out


# -- model preparation ---------------------------------------------------------------
def _resolve_model(model_or_dir: Any) -> tuple[nn.Module, str]:
    from aecore.base import Autoencoder
    from aecore.registry import name_of

    if isinstance(model_or_dir, (str, os.PathLike)):
        from aecore.io import load

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
    from aecore.normalization import Normalization

    config = json.dumps(model.get_config(), sort_keys=True)
    norm = getattr(model, "normalization", None) or Normalization("none")
    digest = hashlib.sha256(f"{name}\n{config}".encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {
        "aecore.format": FORMAT,
        "aecore.format_version": str(FORMAT_VERSION),
        "aecore.model": name,
        "aecore.config": config,
        "aecore.normalization": json.dumps(norm.to_dict()),
        "aecore.input_shape": json.dumps(list(model.input_shape)),
        "aecore.latent_dim": str(model.latent_dim),
        "aecore.version": __version__,
        "aecore.torch_version": torch.__version__.split("+")[0],
        "aecore.export_id": digest.hexdigest()[:20],
    }


class _PartGraph(nn.Module):
    """One part as a module whose forward torch.export traces."""

    def __init__(self, model: nn.Module, part: str) -> None:
        super().__init__()
        self.model = model
        self.part = part

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.part == "encoder":
            return self.model.encode(inp)
        if self.part == "decoder":
            return self.model.decode(inp)
        return self.model(inp)


class _AllParts(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        return self.model(x), self.model.encode(x), self.model.decode(z)


#: graph names in the combined trace (its two inputs need distinct output names)
_ALL_IO = {"inputs": ("x", "z"), "outputs": ("x_hat", "z_of_x", "x_hat_of_z")}
_SLICES = {
    "full": (("x",), ("x_hat",)),
    "encoder": (("x",), ("z_of_x",)),
    "decoder": (("z",), ("x_hat_of_z",)),
}


def _example_inputs(model: nn.Module, part: str) -> tuple[torch.Tensor, ...]:
    # batch 2: a batch of 1 would be specialised to a constant by the tracer
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *model.input_shape), generator=g)
    z = torch.randn((2, model.latent_dim), generator=g)
    if part == "decoder":
        return (z,)
    if part == "all":
        return (x, z)
    return (x,)


def _to_onnx(model: nn.Module, name: str, part: str, module: nn.Module, opset: int):
    """Trace ``module`` (torch.export), replace custom ops, translate (torch.onnx)."""
    args = _example_inputs(model, part)
    batch = torch.export.Dim(BATCH_DIM)
    if part == "all":
        dynamic = {"x": {0: batch}, "z": {0: torch.export.Dim(f"{BATCH_DIM}_z")}}
        names = _ALL_IO
    else:
        dynamic = {"inp": {0: batch}}
        names = {"inputs": SIGNATURES[part][:1], "outputs": SIGNATURES[part][1:]}
    try:
        with _quiet():
            program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise _export_failure(name, part, exc, "tracing") from None
    program = _decompose_custom_ops(program, name, part)
    try:
        with _quiet(), _reused_op_registry():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=list(names["inputs"]),
                output_names=list(names["outputs"]),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise _export_failure(name, part, exc, "translation to ONNX") from None
    return onnx_program.model_proto


def _decompose_custom_ops(program, name: str, part: str):
    """Replace every non-ATen op (aecore's kernels, plugins' own ops) by its registered
    plain-PyTorch equivalent, so the ONNX graph holds standard ops only."""
    _register_aecore_ops()
    table: dict[Any, Callable] = {}
    for node in program.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        if op.namespace in ("aten", "prims"):
            continue
        fn = _DECOMPOSITIONS.get(op)
        if fn is None:
            raise OnnxExportError(
                f"cannot export {name} ({part}) to ONNX: custom op "
                f"{op.namespace}::{op._opname} has no plain-PyTorch equivalent for "
                f"export; register one with aecore.onnx_export.register_export_decomposition"
            )
        table[op] = fn
    if not table:
        return program
    try:
        with _quiet():
            return program.run_decompositions(table)
    except Exception as exc:
        ops = ", ".join(f"{op.namespace}::{op._opname}" for op in table)
        raise OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: replacing {ops} by its plain-PyTorch "
            f"equivalent failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _topk_sparsify(z: torch.Tensor, k: int):
    """``aecore::topk_sparsify(z, k) -> (out, indices)`` in plain PyTorch: TopK +
    ScatterElements in ONNX (the indices feed only the fused backward, so the exporter
    drops them from inference graphs)."""
    values, indices = torch.topk(z, k, dim=1)
    return torch.zeros_like(z).scatter(1, indices, values), indices


#: aecore's compiled ops on inference paths, by name (registered when the extension is)
_AECORE_OPS: dict[str, Callable] = {"topk_sparsify": _topk_sparsify}
_aecore_ops_registered = False


def _register_aecore_ops() -> None:
    """Register the plain-PyTorch equivalents of aecore's compiled ops, once, when the
    extension providing them is loaded. ``aecore.ops`` may publish more (or newer) in
    ``EXPORT_DECOMPOSITIONS`` (op name or overload -> function); user registrations win."""
    global _aecore_ops_registered
    if _aecore_ops_registered:
        return
    _aecore_ops_registered = True
    try:
        import aecore.ops  # loads the extension, which defines torch.ops.aecore.*
    except ImportError:
        return
    table: dict[Any, Callable] = {**_AECORE_OPS, **getattr(aecore.ops, "EXPORT_DECOMPOSITIONS", {})}
    for op, fn in table.items():
        if isinstance(op, str):
            try:
                op = getattr(torch.ops.aecore, op)
            except (AttributeError, RuntimeError):  # the extension is not built
                continue
        overloads = (
            [getattr(op, name) for name in op.overloads()]
            if isinstance(op, torch._ops.OpOverloadPacket)
            else [op]
        )
        for overload in overloads:
            _DECOMPOSITIONS.setdefault(overload, fn)


_registry_lock = threading.Lock()
_registries: dict[tuple, Any] = {}  # from_torchlib arguments -> registry


@contextlib.contextmanager
def _reused_op_registry() -> Iterator[None]:
    """torch.onnx rebuilds its table of ATen -> ONNX functions (about a second) on every
    export; build it once per opset and process. The exporter only reads the table (we
    pass no custom translations). This reaches into torch's private exporter module,
    so it is guarded: where that changes, exports are just slower."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, *args, **kwargs):
        if klass is not cls:  # a subclass: not ours to cache
            return build(klass, *args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _registries:
            _registries[key] = build(klass, *args, **kwargs)
        return _registries[key]

    with _registry_lock:
        cls.from_torchlib = classmethod(from_torchlib)
        try:
            yield
        finally:
            cls.from_torchlib = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress, logs warnings (e.g. torchvision missing) and, on
    failure, dumps the partial graph to stderr; our error says what failed instead."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- naming the failing operation ----------------------------------------------------
_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w]+)\.([\w]+)"),
)


def _export_failure(name: str, part: str, exc: BaseException, stage: str) -> OnnxExportError:
    if "Constraints violated" in str(exc) and "specialized it to be a constant" in str(exc):
        return OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: its forward works only for the batch "
            f"size it was traced with, and ONNX graphs take any batch size; derive shapes "
            f"from the input (x.reshape(len(x), -1) or reshape(-1, ...)), not constants"
        )
    op = _failing_op(exc)
    where = _user_frame(exc)
    what = op or where or "an operation"
    detail = _first_line(_innermost(exc))
    if op and where:
        what = f"{op} at {where}"
    return OnnxExportError(
        f"cannot export {name} ({part}) to ONNX: {what} failed in {stage}: {detail}"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _innermost(exc: BaseException) -> BaseException:
    return _chain(exc)[-1]


def _failing_op(exc: BaseException) -> str | None:
    for e in _chain(exc):
        text = str(e)
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                qualified = m.group(1)
                namespace, _, op = qualified.partition(".")
                return f"torch op {namespace}::{op or m.group(2)}"
    return None


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch, the ONNX packages, the standard
    library and this module: the model line that the tracer could not handle."""
    import sysconfig

    import onnx
    import onnxscript

    packages = (torch, onnx, onnxscript)
    skip = tuple(os.path.dirname(m.__file__) + os.sep for m in packages if m.__file__)
    skip += (sysconfig.get_paths()["stdlib"] + os.sep,)
    found = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            filename = frame.filename
            if filename.startswith(skip) or filename == __file__ or "<" in filename:
                continue  # "<...>": generated code
            code = (frame.line or "").strip()
            found = f"`{code}` ({os.path.basename(filename)}:{frame.lineno} in {frame.name})"
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(exc).__name__


# -- graph surgery and checks ---------------------------------------------------------
def _slice(combined, part: str):
    """The sub-graph of the combined export that computes one part, with the part's
    own input/output names."""
    import onnx.utils

    inputs, outputs = _SLICES[part]
    proto = onnx.utils.Extractor(combined).extract_model(list(inputs), list(outputs))
    del proto.opset_import[:]  # keep the combined model's opsets and IR version
    proto.opset_import.extend(combined.opset_import)
    proto.ir_version = combined.ir_version
    proto.producer_name = combined.producer_name
    proto.producer_version = combined.producer_version
    _rename_value(proto.graph, inputs[0], SIGNATURES[part][0])
    _rename_value(proto.graph, outputs[0], SIGNATURES[part][1])
    return proto


def _rename_value(graph, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, value in enumerate(seq):
                if value == old:
                    seq[i] = new
    for seq in (graph.input, graph.output, graph.value_info):
        for value in seq:
            if value.name == old:
                value.name = new


def _name_batch_axis(proto) -> None:
    """Call the symbolic first axis of the graph input ``batch`` everywhere."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if dims else ""
    if not symbol or symbol == BATCH_DIM:
        return
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_DIM


def _walk_nodes(graph) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _walk_nodes(attr.g)
            for sub in attr.graphs:
                yield from _walk_nodes(sub)


def _check_standard(proto, name: str, part: str) -> None:
    """Standard, deterministic ops only (local functions of the model count too)."""
    nodes = list(_walk_nodes(proto.graph))
    for function in proto.functions:
        nodes.extend(function.node)
    for node in nodes:
        if node.domain not in _STANDARD_DOMAINS:
            raise OnnxExportError(
                f"cannot export {name} ({part}) to ONNX: the graph holds the non-standard op "
                f"{node.domain}::{node.op_type}; inference paths must use standard ops"
            )
        if node.op_type in RANDOM_OPS:
            raise OnnxExportError(
                f"cannot export {name} ({part}) to ONNX: its eval-mode forward draws random "
                f"numbers (ONNX {node.op_type}); inference graphs must be deterministic"
            )


def _check_model(proto, name: str, part: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: the exported graph fails "
            f"onnx.checker: {_first_line(exc)}"
        ) from None
