"""Custom ops on inference paths become plain PyTorch before translation, so that ONNX
graphs hold standard ops only. aecore's own kernels publish their equivalents in
``aecore.ops.EXPORT_DECOMPOSITIONS``; a plugin with its own op registers one with
``register_export_decomposition``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from aecore.errors import ConfigError, OnnxExportError
from aecore.onnx.diagnose import first_line, quiet
from aecore.ops import EXPORT_DECOMPOSITIONS

#: export-time decompositions: torch op overload -> plain-PyTorch function
_DECOMPOSITIONS: dict[Any, Callable] = {}


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


def decompose_custom_ops(program, name: str, part: str):
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
                f"export; register one with aecore.onnx.register_export_decomposition"
            )
        table[op] = fn
    if not table:
        return program
    try:
        with quiet():
            return program.run_decompositions(table)
    except Exception as exc:
        ops = ", ".join(f"{op.namespace}::{op._opname}" for op in table)
        raise OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: replacing {ops} by its plain-PyTorch "
            f"equivalent failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None


_aecore_ops_registered = False


def _register_aecore_ops() -> None:
    """Register the plain-PyTorch equivalents that ``aecore.ops`` publishes for its
    compiled ops (``EXPORT_DECOMPOSITIONS``: op name -> function), once, where the
    extension defining them is loaded; user registrations win."""
    global _aecore_ops_registered
    if _aecore_ops_registered:
        return
    _aecore_ops_registered = True
    for op, fn in EXPORT_DECOMPOSITIONS.items():
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
