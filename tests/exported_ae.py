"""A small exported ``ae`` shared by the runtime and inference-CLI tests: 12 features,
code 3, a min-max normalisation, saved as a folder and exported with ``--all``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import aecore
from aecore import cli
from aecore.data import Normalization
from aecore.testing import VECTOR_SHAPE, ModelSpec


def export_small_ae(tmp: Path):
    """(model, folder, path of the full graph) under ``tmp``."""
    model = ModelSpec(aecore.model_class("ae"), VECTOR_SHAPE, {"hidden": [16]}).build().eval()
    model.normalization = Normalization("minmax", np.zeros(12), np.linspace(2.0, 24.0, 12))
    folder = aecore.save(model, tmp / "model")
    path = tmp / "export" / "m.onnx"
    path.parent.mkdir()
    assert cli.main(["export", str(folder), "--out", str(path), "--all"]) == 0
    return model, folder, path


def rows(n: int, seed: int = 0) -> np.ndarray:
    """Inputs in data units (0..16)."""
    return (np.random.default_rng(seed).random((n, 12)) * 16).astype(np.float32)


def torch_reference(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """What PyTorch computes for each runtime method, in the runtime's units."""
    norm = model.normalization
    xn = torch.from_numpy(norm.apply(x))
    with torch.no_grad():
        z, x_hat = model.encode(xn), model(xn)
    return {
        "encode": z.numpy(),
        "reconstruct": norm.invert(x_hat.numpy()),
        "decode": norm.invert(model.decode(z).detach().numpy()),
        "score": (x_hat - xn).pow(2).mean(1).numpy(),
    }
