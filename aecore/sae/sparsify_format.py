"""EleutherAI sparsify SAE folders: ``cfg.json`` + ``sae.safetensors``, the layout
``sparsify.SparseCoder.save_to_disk`` writes and ``SparseCoder.load_from_disk`` reads
(eai-sparsify 1.3).

The weights: ``encoder.weight`` (num_latents, d_in), ``encoder.bias`` (num_latents),
``W_dec`` (num_latents, d_in), ``b_dec`` (d_in); ``cfg.json`` holds the
``SparseCoderConfig`` fields plus ``d_in``. An SAE encodes the top ``k`` of
``relu(encoder(x - b_dec))`` per row and decodes ``acts @ W_dec + b_dec``: aecore's
``sae-topk`` exactly (a ReLU before or after the top-k selection keeps the same
values). sparsify's loader builds every tensor in the first one's dtype and requires
exactly these four names.

Only TopK SAEs travel: transcoders, skip connections and the ``groupmax`` activation
have no aecore counterpart and are refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aecore.errors import ConfigError, ModelFileError
from aecore.sae.format_common import (
    FLOAT_DTYPES,
    ROW_NORM_TOLERANCE,
    RawSAE,
    build_sae,
    config_int,
    json_bytes,
    model_label,
    raw_sae,
    read_config,
    read_weights,
    require_folder,
    sae_kind,
    tensor_bytes,
    write_folder,
)

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
#: SparseCoderConfig's defaults: what a cfg.json without the field means
DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}


def save_sparsify(model, path: str | os.PathLike, *, overwrite: bool = False):
    """Write the aecore ``sae-topk`` ``model`` as a sparsify folder ``path``."""
    if sae_kind(model) != "topk":
        raise ConfigError(
            f"sparsify stores TopK SAEs only; got {model_label(model)} (export it in the "
            f"SAELens format instead: save_saelens, --format saelens)"
        )
    sae = raw_sae(model)
    n, d = sae.W_enc.shape
    dtype = model.W_enc.dtype if model.W_enc.dtype in FLOAT_DTYPES else torch.float32
    norms = sae.W_dec.norm(dim=1)
    cfg = {
        **DEFAULTS,
        "expansion_factor": max(1, n // d),  # unused: num_latents says the width
        # sparsify's trainer renormalises the decoder rows to 1 when this is set: only
        # when they are already there, so further training starts from this function
        "normalize_decoder": bool(((norms - 1).abs() <= ROW_NORM_TOLERANCE).all()),
        "num_latents": n,
        "k": model.rule.k,
        "d_in": d,
    }
    weights = {
        "encoder.weight": sae.W_enc,
        "encoder.bias": sae.b_enc,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    blob = tensor_bytes({k: v.to(dtype) for k, v in weights.items()})
    files = {CONFIG: json_bytes(cfg), WEIGHTS: blob}
    return write_folder(path, files, overwrite=overwrite, what="sparsify", marker=CONFIG)


def load_sparsify(path: str | os.PathLike):
    """The aecore ``sae-topk`` (eval mode, CPU, float32) computing what the sparsify
    folder ``path`` computes."""
    path = require_folder(path, "sparsify", (CONFIG, WEIGHTS))
    where = path / CONFIG
    cfg = {**DEFAULTS, **read_config(where)}
    for key in ("transcode", "skip_connection", "multi_topk", "normalize_decoder"):
        if not isinstance(cfg[key], bool):
            raise ModelFileError(f"{where}: {key} must be true or false; got {cfg[key]!r}")
    if cfg["transcode"]:
        raise ModelFileError(
            f"{where}: a transcoder (transcode: true) predicts a module's output from its "
            f"input; aecore imports sparsify SAEs only"
        )
    if cfg["skip_connection"]:
        raise ModelFileError(
            f"{where}: a skip connection (skip_connection: true, W_skip) has no aecore "
            f"counterpart; aecore imports sparsify SAEs without one"
        )
    if cfg["activation"] != "topk":
        raise ModelFileError(
            f"{where}: activation {cfg['activation']!r} is not supported; aecore imports "
            f"sparsify SAEs with activation 'topk'"
        )
    if cfg.get("signed", False):  # earlier releases' signed top-k keeps negative codes
        raise ModelFileError(f"{where}: signed top-k (signed: true) is not supported")
    d = config_int(cfg, "d_in", where)
    n = config_int(cfg, "num_latents", where, low=0)
    if n == 0:
        n = d * config_int(cfg, "expansion_factor", where)
    k = config_int(cfg, "k", where, high=n)
    w = read_weights(
        path / WEIGHTS,
        {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)},
    )
    sae = RawSAE(w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"])
    return build_sae("sae-topk", sae, {"k": k}, path)
