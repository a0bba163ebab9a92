"""``AnomalyDetector``: an aecore autoencoder as an anomaly detector with PyOD's
conventions, for pipelines that already speak them.

After ``fit(X)``: ``decision_scores_`` (the training rows' anomaly scores, higher = more
anomalous: the reconstruction error in normalised units), ``threshold_`` (the
``contamination`` share of them lies above it) and ``labels_`` (1 = outlier). Then
``decision_function``, ``predict`` (0 / 1), ``predict_proba(method="linear" | "unify")``
and ``predict_confidence`` on new rows. The threshold travels with the model:
``aecore.save(detector.model_, DIR)`` writes it into ``model.json``, ``aecore export``
into the ONNX metadata, and a loaded folder (``aecore.runtime``'s numpy interface) or
``aecore.runtime.OnnxAutoencoder`` offers the same four methods without torch.

Everything else (the model, ``normalize``, training settings, ``transform``) is
``aecore.sklearn.AutoencoderTransformer``'s; ``score_samples`` keeps scikit-learn's sign
(higher = more normal), as does ``score``.
"""

from __future__ import annotations

import numpy as np

from aecore.detection import DetectorMethods, ScoreThreshold
from aecore.sklearn import AutoencoderTransformer


class AnomalyDetector(DetectorMethods, AutoencoderTransformer):
    """PyOD-style anomaly detector on any aecore vector model (see the module's
    docstring); the parameters are ``AutoencoderTransformer``'s."""

    def fit(self, X, y=None) -> AnomalyDetector:
        """Train on ``X`` (``y`` ignored) and fit the contamination threshold on its rows."""
        super().fit(X, y)
        x, _ = self._normalized(X)
        scores = -self._scores(x).astype(np.float64)
        self.detector = ScoreThreshold.fit(scores, float(self.contamination))
        self.model_.detector = self.detector  # saved and exported with the model
        self.decision_scores_ = scores
        self.threshold_ = self.detector.threshold
        self.labels_ = self.detector.labels(scores)
        return self

    def _anomaly_scores(self, X) -> np.ndarray:
        return -self.score_samples(X)
