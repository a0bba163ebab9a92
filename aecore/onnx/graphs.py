"""ONNX graphs after translation: the three parts sliced out of one combined trace (and
a detector's score graph, traced on its own), the
batch axis named, and the checks every exported graph passes (standard, deterministic
ops only; ``onnx.checker`` with full shape inference)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aecore.errors import OnnxExportError
from aecore.onnx.diagnose import first_line

#: graph input and output names per part
SIGNATURES = {
    "full": ("x", "x_hat"),
    "encoder": ("x", "z"),
    "decoder": ("z", "x_hat"),
    "score": ("x", "score"),
}
BATCH_DIM = "batch"
#: graph names in the combined trace of all parts (its two inputs need distinct outputs)
ALL_PARTS_IO = {"inputs": ("x", "z"), "outputs": ("x_hat", "z_of_x", "x_hat_of_z")}
_SLICES = {
    "full": (("x",), ("x_hat",)),
    "encoder": (("x",), ("z_of_x",)),
    "decoder": (("z",), ("x_hat_of_z",)),
}
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


def slice_part(combined, part: str):
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


def name_batch_axis(proto) -> None:
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


def check_standard(proto, name: str, part: str) -> None:
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


def check_float32_io(proto, name: str, part: str) -> None:
    """Every graph input and output is float32, what the runtime serves (a plugin that
    returns float64 from a float32 model exports a graph nothing can serve)."""
    import onnx

    for value in (*proto.graph.input, *proto.graph.output):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise OnnxExportError(
                f"cannot export {name} ({part}) to ONNX: its {value.name!r} is "
                f"{onnx.helper.tensor_dtype_to_np_dtype(elem)}, not float32: the model "
                f"computes in float32, so return its dtype (a .double() in encode or decode?)"
            )


def check_model(proto, name: str, part: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: the exported graph fails "
            f"onnx.checker: {first_line(exc)}"
        ) from None
