"""Deprecated alias of :mod:`aecore.onnx` (the exporter's package), kept so that
plugins written for earlier versions still import; it will be removed."""

import warnings

from aecore.onnx import OnnxExportError, export_onnx, export_protos, register_export_decomposition

warnings.warn("aecore.onnx_export is deprecated: use aecore.onnx", DeprecationWarning, stacklevel=2)

__all__ = ["OnnxExportError", "export_onnx", "export_protos", "register_export_decomposition"]
