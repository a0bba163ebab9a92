"""ONNX parity for the conformance kit: a model's exported graphs compute what PyTorch
computes in eval mode.

``check_onnx_parity(spec)`` is a check like those in ``aecore.testing.checks``;
``assert_onnx_parity`` compares an already exported model (tests that export once and
compare many times use it directly).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aecore.testing.checks import ConformanceError, ModelSpec, registered

#: what the check needs beyond torch
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: batch sizes compared (1: the tracer's special case; 7: odd; 256: a real batch)
BATCH_SIZES = (1, 7, 256)
#: float32 tolerance: |onnx - torch| <= ATOL + RTOL * |torch|
ATOL = 1e-5
RTOL = 1e-5


def check_onnx_parity(spec: ModelSpec) -> None:
    """Export the full model, encoder and decoder of a fresh model and compare their
    onnxruntime outputs with PyTorch's eval outputs at batch sizes 1, 7 and 256."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401

        # the exporter needs onnx; imported here so the other checks run without it
        from aecore.onnx import OnnxExportError, export_protos
    except ImportError as exc:
        raise ConformanceError(
            f"{spec.name}: onnx parity: needs onnx, onnxscript and onnxruntime "
            f"(pip install aecore[onnx]): {exc}"
        ) from None
    model = spec.build().eval()
    with registered(spec.cls) as name:
        try:
            protos = export_protos(model, name)
        except OnnxExportError as exc:
            spec.fail("onnx parity", str(exc))
    message = assert_onnx_parity(
        model, {p: proto.SerializeToString() for p, proto in protos.items()}
    )
    if message:
        spec.fail("onnx parity", message)


def sessions(graphs: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime sessions (CPU) for ``{part: path or serialized bytes}``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return {
        part: onnxruntime.InferenceSession(
            graph if isinstance(graph, bytes) else str(graph),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        for part, graph in graphs.items()
    }


def assert_onnx_parity(model, graphs: dict[str, Any], batch_sizes=BATCH_SIZES) -> str | None:
    """Compare ``graphs`` (``{part: path, bytes or onnxruntime session}``) with
    ``model`` in eval mode; the first mismatch as a message, or None."""
    runs = {p: g if hasattr(g, "run") else sessions({p: g})[p] for p, g in graphs.items()}
    model.eval()
    for n in batch_sizes:
        x = torch.rand((n, *model.input_shape), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            z = model.encode(x)
            expected = {"full": model(x), "encoder": z, "decoder": model.decode(z)}
        feeds = {"full": x, "encoder": x, "decoder": z}
        for part, session in runs.items():
            want = expected[part].float().numpy()
            feed = feeds[part].numpy()
            meta = session.get_modelmeta().custom_metadata_map
            norm = getattr(model, "normalization", None)
            if meta.get("aecore.normalization_in_graph") == "1" and norm is not None:
                # the graph takes and gives data units
                if part != "decoder":
                    feed = norm.invert(feed).astype(np.float32)
                if part != "encoder":
                    want = norm.invert(want).astype(np.float32)
            got = session.run(None, {session.get_inputs()[0].name: feed})[0]
            if got.shape != want.shape:
                return f"{part} graph at batch {n}: output shape {got.shape}, torch {want.shape}"
            bad = ~(np.abs(got - want) <= ATOL + RTOL * np.abs(want))
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                return (
                    f"{part} graph at batch {n}: onnxruntime differs from torch by up to "
                    f"{float(np.nanmax(np.abs(got - want))):.3g} (at {where}: "
                    f"{got[where]:.8g} vs {want[where]:.8g}; tolerance {ATOL} + {RTOL}*|torch|)"
                )
    return None
