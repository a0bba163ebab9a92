"""One numpy interface for a served model, whatever it is: a model folder run by
PyTorch or an ``.onnx`` export run by onnxruntime (``open_model``), with the runtime's
checks, normalisation and batching and PyOD's detector methods (``predict``,
``predict_proba``, ``predict_confidence``) when the model was saved with a threshold."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aecore.errors import ModelFileError, ShapeError
from aecore.keywords import checked_keywords
from aecore.runtime import DEFAULT_BATCH_SIZE, ArrayModel, OnnxAutoencoder


class TorchArrayModel(ArrayModel):
    """A model folder run by PyTorch behind ``OnnxAutoencoder``'s numpy interface."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from aecore.io.model_folder import load

        self.model = load(directory)
        self.name = self.model.metadata["model"]
        self.input_shape = tuple(self.model.input_shape)
        self.latent_dim = self.model.latent_dim
        self.normalization = self.model.normalization
        self.detector = getattr(self.model, "detector", None)
        self.input_range = self.model.input_range
        self.default_score_kind = self.model.default_score_kind
        self.score_kinds = list(self.model.score_kinds)
        self.feature_names = getattr(self.model, "feature_names", None)

    def _kind_scores(self, X, kind: str, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        import torch

        # as given: the model clips rows to its input range and charges what lies beyond
        x = self._apply(self._check_inputs(X))
        if not len(x):
            return np.empty((0,), np.float64)
        batch = torch.from_numpy(np.require(x, np.float32, ["C", "W"]))
        scores = [
            self.model.score(batch[i : i + batch_size], kind=kind).double()
            for i in range(0, len(batch), batch_size)
        ]
        return torch.cat(scores).numpy()

    def _forward(self, part: str, batch: np.ndarray) -> np.ndarray:
        import torch

        # torch refuses read-only buffers (memory maps): copy those
        x = torch.from_numpy(np.require(batch, np.float32, ["C", "W"]))
        with torch.inference_mode():
            if part == "encoder":
                out = self.model.encode(x)
            elif part == "decoder":
                out = self.model.decode(x)
            else:
                out = self.model(x)
        want = (len(batch), *(self.input_shape if part != "encoder" else (self.latent_dim,)))
        if tuple(out.shape) != want:  # a plugin's wrong width, not served as it is
            raise ShapeError(
                f"{type(self.model).__name__}: its {part} part gave {tuple(out.shape)} for "
                f"{len(batch)} rows; expected {want}"
            )
        result = out.float().numpy()
        # the caller changes outputs in place: never hand back a view of the input
        return result.copy() if np.may_share_memory(result, batch) else result


@checked_keywords
def open_model(spec: str) -> ArrayModel:
    """A model folder (torch) or an .onnx file (onnxruntime) by path."""
    path = Path(spec)
    if path.is_dir():
        return TorchArrayModel(path)
    if path.suffix.lower() == ".onnx":
        return OnnxAutoencoder(path)
    if not path.exists():
        raise ModelFileError(f"{spec}: no such model folder or .onnx file")
    raise ModelFileError(f"{spec}: expected a model folder or an .onnx file")
