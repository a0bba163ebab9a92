"""What ``Autoencoder`` does to a subclass's methods when the class is created: tensors
of another dtype are computed in the model's, the keywords a model is built with are
recorded (for ``model_config.config_json``), and a ``score`` the tools cannot call is
refused at once, naming the hooks to define instead."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from aecore.errors import DataError

#: the methods that take a batch of inputs or codes as their first argument: real
#: tensors of another dtype (float64 from ``torch.as_tensor(numpy_array)``, integer
#: pixels or counts, bools) are computed in the model's dtype, as training casts them
TENSOR_METHODS = (
    "forward", "encode", "decode", "loss", "score", "train_step", "encode_sparse",
    "free_energy", "pseudo_likelihood", "elbo", "log_likelihood", "reconstruct",
)  # fmt: skip


def _in_model_dtype(method: Callable) -> Callable:
    # a loss is a mean over rows: of none it is no number (NaN, or an error deep inside)
    needs_rows = method.__name__ in ("loss", "train_step")

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        if needs_rows and isinstance(x, torch.Tensor) and x.dim() and len(x) == 0:
            raise DataError(
                f"{type(self).__name__}.{method.__name__} needs at least one row; "
                f"got an empty batch of shape {tuple(x.shape)}"
            )
        if isinstance(x, torch.Tensor) and not x.is_complex():
            dtype = self.float_dtype()
            if dtype is not None and x.dtype != dtype:
                x = x.to(dtype)
        return method(self, x, *args, **kwargs)

    wrapper.__aecore_dtype_adapter__ = True
    return wrapper


def adapt_tensor_methods(cls: type) -> None:
    for name in TENSOR_METHODS:
        method = cls.__dict__.get(name)
        if callable(method) and not getattr(method, "__aecore_dtype_adapter__", False):
            setattr(cls, name, _in_model_dtype(method))


def record_given_keywords(cls: type) -> None:
    """Wraps ``cls.__init__`` so that a model remembers the keywords it was built with
    (``_given_keywords``, those of the outermost constructor): ``get_config`` must give
    them back, or a saved model is rebuilt otherwise (``model_config.config_json``)."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "__aecore_records__", False):
        return

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_given_keywords" not in self.__dict__:  # a subclass's super().__init__ is not
            self.__dict__["_given_keywords"] = frozenset(kwargs)
        init(self, *args, **kwargs)

    wrapper.__aecore_records__ = True
    cls.__init__ = wrapper


def check_score_override(cls: type) -> None:
    """Every tool (the detectors, ``aecore score``, exports) calls ``score(x, kind=...)``:
    a ``score`` without ``kind`` would fail inside them, or be bypassed by the served
    model (which scores through ``anomaly_score``)."""
    method = cls.__dict__.get("score")
    if not callable(method):
        return
    parameters = inspect.signature(method).parameters.values()
    if any(p.name == "kind" or p.kind is p.VAR_KEYWORD for p in parameters):
        return  # (a pass-through of **kwargs reaches the base's kind)
    raise TypeError(
        f"{cls.__name__} overrides score(x) without a kind: keep score and define "
        f"anomaly_score(x, kind) instead, listing the kind in score_kinds (and "
        f"default_score_kind to score by it by default; exportable_score_kinds where an "
        f"ONNX export can compute it): score checks the rows and holds them to the "
        f"input range, and every tool calls score(x, kind=...)"
    )
