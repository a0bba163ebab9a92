"""Activations of neural networks as training data for sparse autoencoders: extract
them with forward hooks into a sharded, memory-mapped cache (``extract_activations``),
read a hook's rows back as one array (``ActivationCache``, also the data source
``activations:DIR[:HOOK]``), shuffle them in bounded memory (``block_shuffle_order``)
and measure a reconstruction spliced into a causal LM (``ce_loss_recovered``).

The names are imported on first use: the cache reader is numpy-only, extraction and
the splice metric need torch.
"""

_LAZY = {
    "ActivationCache": "aecore.activations.cache",
    "extract_activations": "aecore.activations.extract",
    "block_shuffle_order": "aecore.activations.order",
    "ce_loss_recovered": "aecore.activations.splice",
    "read_manifest": "aecore.activations.manifest",
}

__all__ = list(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aecore.activations' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(__all__)
