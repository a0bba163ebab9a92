"""Exceptions. All derive from ValueError or RuntimeError, so existing handlers work;
the CLI prints any AecoreError as one line without a traceback. And ``warn``, which
points a warning at the user's line."""

import os
import sys
import warnings


class AecoreError(Exception):
    """Base of every error aecore raises on purpose (bad input, bad files, ...)."""


class ConfigError(AecoreError, ValueError):
    """A hyperparameter or constructor argument is out of range or of the wrong type."""


class ShapeError(AecoreError, ValueError):
    """A tensor or array has a shape the model or op does not accept."""


class DataError(AecoreError, ValueError):
    """A data source is missing, malformed or holds values that cannot be used."""


class RegistryError(AecoreError, LookupError):
    """A model name is unknown, broken, or claimed by two distributions."""


class ModelFileError(AecoreError, ValueError):
    """A saved model, checkpoint or ONNX file is not what it claims to be."""


class TrainingError(AecoreError, RuntimeError):
    """Training cannot go on (non-finite loss, interrupted, ...)."""


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGTERM/SIGINT, after writing a checkpoint to resume from
    (``saved``), or with none to write (a model's layer-wise pretraining keeps none);
    ``reason``: what asked for the stop (a signal's name, as the command line gives it)."""

    def __init__(self, message: str, saved: bool = True, reason: str | None = None) -> None:
        super().__init__(message)
        self.saved = saved
        self.reason = reason


class NonFiniteError(AecoreError, RuntimeError):
    """An op met NaN or infinite values it cannot rank (a diverging model's
    pre-activations, say); the trainer reports it as a non-finite step."""


class FileWriteError(AecoreError, OSError):
    """Writing a file failed (a full disk, an I/O error, no permission): the message
    names the file and the step; the previous version of the file is intact."""


class InUseError(AecoreError, RuntimeError):
    """A folder aecore writes as a unit is held by another process (which the message
    names)."""


class OnnxExportError(AecoreError, RuntimeError):
    """A model cannot be exported to ONNX (the message names the model and the op)."""


class IgnoredSettingWarning(UserWarning):
    """A setting was given that has no effect on this model or run (the message says
    which, and what to set instead)."""


class KeywordError(ConfigError, TypeError):
    """A function was called with a keyword it does not take; the message names the
    closest one. Also a TypeError, as Python's own error for it is."""


def _library_folders() -> tuple[str, ...]:
    # aecore, its built-in plugins and torch (whose Module.__call__ sits between a
    # user's call and a plugin's forward) are never the line a warning is about
    import contextlib
    import importlib.util

    # (and contextlib, whose frames sit between a `with` of the library's and its body)
    folders = [os.path.dirname(__file__)]
    for package in ("aecore_plugins", "torch"):
        spec = importlib.util.find_spec(package) if package in sys.modules else None
        if spec is not None and spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
    return (*(os.path.join(folder, "") for folder in folders), contextlib.__file__)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the library, however
    deep in it the warning arises (what a fixed ``stacklevel`` gets wrong once a call
    passes through a wrapper or another path)."""
    folders = _library_folders()
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(folders):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
