"""Run exported models with onnxruntime: numpy in, numpy out, no torch needed.

Needs only ``numpy`` and ``onnxruntime``; importing this module never imports torch (the
package declares torch for training: a serving image installs aecore with ``--no-deps``,
see the README). Export with ``aecore export DIR --out model.onnx --all``
(or ``aecore.export_onnx(model, "model.onnx", part="all")``), then::

    from aecore.runtime import OnnxAutoencoder
    ae = OnnxAutoencoder("model.onnx")
    z = ae.encode(x)               # codes, (N, latent_dim)
    x_hat = ae.reconstruct(x)      # data units, like x
    s = ae.score(x)                # anomaly score per row, (N,)

Units: ``encode``, ``reconstruct`` and ``score`` take data in the units the model was
trained on (raw features, e.g. pixel values 0..16); the normalisation stored in the
file is applied first, exactly as in training. ``reconstruct`` and ``decode`` return
data units (the normalisation inverted). ``score`` is ``Autoencoder.score`` of the
model on normalised inputs: by default the kind of the exported detector, else the
model's default kind where the export holds its score graph, else the mean squared
reconstruction error per row *in normalised units*, so features count equally whatever
their raw scale; ``score_kind()`` says which.

``model.onnx`` (the full graph) serves ``reconstruct`` and ``score``; ``encode`` and
``decode`` use ``model.encoder.onnx`` and ``model.decoder.onnx`` beside it, which
``--all`` writes. Any one of the three files may be given: the others are found by
name and must come from the same export. Without the full graph, ``reconstruct``
chains encoder and decoder. A detector whose score is not the reconstruction error
(an RBM's free energy, a VAE's likelihood) is served from ``model.score.onnx``, which
``--all`` adds where the model computes that score deterministically.
"""

from aecore.runtime.arrays import ArrayModel
from aecore.runtime.format import (
    DEFAULT_BATCH_SIZE,
    FORMAT,
    FORMAT_VERSION,
    PARTS,
    SCORE_PART,
    part_paths,
    score_path,
)
from aecore.runtime.onnx_model import OnnxAutoencoder

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "FORMAT",
    "FORMAT_VERSION",
    "PARTS",
    "SCORE_PART",
    "ArrayModel",
    "OnnxAutoencoder",
    "part_paths",
    "score_path",
]
