"""aecore: plugin-based autoencoders for PyTorch.

This module stays import-light: ``aecore.runtime`` must work where torch is not
installed, so everything that needs torch is loaded on first attribute access.
"""

from aecore._version import __version__

# public name -> module that defines it (imported on first use)
_LAZY = {
    "Autoencoder": "aecore.base",
    "capabilities": "aecore.registry",
    "create": "aecore.registry",
    "list_models": "aecore.registry",
    "model_class": "aecore.registry",
    "model_entries": "aecore.registry",
    "TrainConfig": "aecore.config",
    "DemoRecipe": "aecore.config",
    "Trainer": "aecore.training",
    "History": "aecore.training",
    "save": "aecore.io.model_folder",
    "load": "aecore.io.model_folder",
    "load_data": "aecore.data",
    "prepare": "aecore.data",
    "Normalization": "aecore.data",
    "AecoreError": "aecore.errors",
    "AutoencoderTransformer": "aecore.sklearn",
    "AnomalyDetector": "aecore.anomaly",
    "open_model": "aecore.serving",
    "export_onnx": "aecore.onnx",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aecore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
