"""From a model to an ONNX ModelProto: torch.export traces one part (or all three at
once), custom ops are replaced by their plain-PyTorch equivalents, torch.onnx translates."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aecore.onnx.decompositions import decompose_custom_ops
from aecore.onnx.diagnose import export_failure, quiet
from aecore.onnx.graphs import ALL_PARTS_IO, BATCH_DIM, SIGNATURES


class PartGraph(nn.Module):
    """One part as a module whose forward torch.export traces."""

    def __init__(self, model: nn.Module, part: str, score_kind: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.part = part
        self.score_kind = score_kind

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.part == "decoder":
            return self.model.decode(inp)
        if self.part == "score":  # clips, and charges rows beyond the range
            return self.model.bounded_score(inp, self.score_kind, self.model.traceable_score)
        x = clipped(self.model, inp)
        if self.part == "encoder":
            return self.model.encode(x)
        return self.model(x)


def clipped(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows clipped to the model's input range, as the estimator's ``transform`` takes
    new rows: every graph that takes rows does so (the score graph through
    ``Autoencoder.bounded_score``, which also charges the distance beyond)."""
    lo_hi = model.input_range
    return x.clamp(*lo_hi) if lo_hi is not None else x


class AllParts(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        x = clipped(self.model, x)
        return self.model(x), self.model.encode(x), self.model.decode(z)


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


def to_onnx(model: nn.Module, name: str, part: str, opset: int, score_kind: str | None = None):
    """The ONNX ModelProto of one part of ``model`` (or of ``"all"`` three in one graph;
    the score graph computes ``score_kind``): trace (torch.export), replace custom ops,
    translate (torch.onnx)."""
    module = AllParts(model) if part == "all" else PartGraph(model, part, score_kind)
    args = _example_inputs(model, part)
    batch = torch.export.Dim(BATCH_DIM)
    if part == "all":
        dynamic = {"x": {0: batch}, "z": {0: torch.export.Dim(f"{BATCH_DIM}_z")}}
        names = ALL_PARTS_IO
    else:
        dynamic = {"inp": {0: batch}}
        names = {"inputs": SIGNATURES[part][:1], "outputs": SIGNATURES[part][1:]}
    try:
        with quiet():
            program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise export_failure(name, part, exc, "tracing") from None
    program = decompose_custom_ops(program, name, part)
    try:
        with quiet(), _reused_op_registry():
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
        raise export_failure(name, part, exc, "translation to ONNX") from None
    return onnx_program.model_proto


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
