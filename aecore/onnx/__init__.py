"""ONNX export: ``export_onnx`` writes checked, self-contained graphs with the metadata
that ``aecore.runtime`` (torch-free) reads back. ``export`` is the API, ``trace`` turns a
model into ONNX, ``decompositions`` replaces custom ops, ``graphs`` slices and checks,
``diagnose`` explains failures."""

from aecore.errors import OnnxExportError
from aecore.onnx.decompositions import register_export_decomposition
from aecore.onnx.export import DEFAULT_OPSET, MIN_OPSET, export_onnx, export_protos
from aecore.runtime.format import part_paths

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "OnnxExportError",
    "export_onnx",
    "export_protos",
    "part_paths",
    "register_export_decomposition",
]
