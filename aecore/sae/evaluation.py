"""What ``aecore eval`` reports for a sparse autoencoder: the SAE metrics on the test
rows and, when the data come from a synthetic superposition in its own units, how well
the learned dictionary and codes match the generator's true features."""

from __future__ import annotations

from typing import Any

import torch

from aecore.data.superposition import superposition_from_source
from aecore.sae.metrics import sae_metrics

#: test rows compared with a synthetic source's ground truth
TRUTH_ROWS = 50_000


def evaluation_metrics(model: Any, x_test: torch.Tensor, prepared: Any) -> dict[str, float]:
    """Explained variance, L0, dead latents and shrinkage on ``x_test``; on a
    ``superposition`` source without normalisation (the generator's units) the same
    plus MMCS and MCC over the test split's first ``TRUTH_ROWS`` rows instead."""
    truth = None
    if prepared is not None and prepared.normalization.kind == "none":
        truth = superposition_from_source(str(prepared.record.get("source", "")))
    if truth is None:
        metrics = sae_metrics(model, x_test)
    else:
        rows = prepared.split.test[:TRUTH_ROWS]
        x = torch.as_tensor(prepared.dataset.x[rows])
        metrics = sae_metrics(model, x, truth=truth, rows=rows)
    return {name: float(value) for name, value in metrics.items()}
