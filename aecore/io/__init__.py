"""Files: model folders (``save`` / ``load``), pickle-free tensor files and atomic
writes. ``atomic`` is torch-free; the rest is imported on first use so that the
torch-free runtime can write files through this package."""

_LAZY = {
    "save": "aecore.io.model_folder",
    "load": "aecore.io.model_folder",
    "read_record": "aecore.io.model_folder",
}

__all__ = list(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aecore.io' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
