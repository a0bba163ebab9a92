"""The data normalisation folded into an exported graph: ``x`` in data units is
normalised by the graph's first nodes and ``x_hat`` mapped back by its last, so that the
runtime's hot path is one session call (``aecore.normalization_in_graph`` says so)."""

from __future__ import annotations

import numpy as np

from aecore.data.normalization import Normalization
from aecore.onnx.graphs import SIGNATURES, _rename_value

#: the metadata key that tells the runtime the graph takes and gives data units
IN_GRAPH_KEY = "aecore.normalization_in_graph"
#: the largest |shift| / scale folded: a graph takes float32, whose spacing at a value
#: is 6e-8 of it, so a feature far from zero for its spread (a timestamp, 1.7e9 +- 100)
#: would lose its variation before the graph subtracts the shift; the runtime then
#: normalises in the input's precision (float64 stays float64) instead
MAX_FOLDED_OFFSET = 1e3


def fold_normalization(proto, part: str, norm: Normalization, input_shape) -> bool:
    """Adds the normalisation to ``proto`` (one part of an export); False when there is
    none to add, or when float32 inputs would lose a feature's variation (see
    ``MAX_FOLDED_OFFSET``). The arithmetic is the runtime's numpy path: ``(x - shift) /
    scale`` in and ``y * scale + shift`` out, constant features (scale 0) only shifted."""
    from onnx import helper, numpy_helper

    if norm.kind == "none":
        return False
    safe = np.where(norm.scale > 0, norm.scale, 1.0)
    if float(np.max(np.abs(norm.shift) / safe)) > MAX_FOLDED_OFFSET:
        return False
    graph = proto.graph
    shape = () if norm.shift.size == 1 else tuple(input_shape)
    consts = {
        "aecore_norm_shift": norm.shift.reshape(shape),
        "aecore_norm_inverse_scale": (1.0 / safe).reshape(shape),
        "aecore_norm_scale": safe.reshape(shape),
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    inp, out = SIGNATURES[part]
    if inp == "x":
        _rename_value(graph, "x", "x_normalized")
        graph.input[0].name = "x"
        nodes = [
            helper.make_node("Sub", ["x", "aecore_norm_shift"], ["x_centred"]),
            helper.make_node("Mul", ["x_centred", "aecore_norm_inverse_scale"], ["x_normalized"]),
        ]
        for i, node in enumerate(nodes):
            graph.node.insert(i, node)
    if out == "x_hat":
        _rename_value(graph, "x_hat", "x_hat_normalized")
        graph.output[0].name = "x_hat"
        graph.node.extend(
            [
                helper.make_node(
                    "Mul", ["x_hat_normalized", "aecore_norm_scale"], ["x_hat_scaled"]
                ),
                helper.make_node("Add", ["x_hat_scaled", "aecore_norm_shift"], ["x_hat"]),
            ]
        )
    # constants no longer used by a part (the decoder has no input side) are dropped
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used or not t.name.startswith("aecore_norm")]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return True
