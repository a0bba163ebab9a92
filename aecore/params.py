"""Hyperparameter checks shared by the plugins: each failure names the parameter,
its value and what is allowed."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from aecore.errors import ConfigError, IgnoredSettingWarning, warn


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {value!r}")
    return value


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A real number in [low, high] (or open at either end), as a Python float (numpy
    scalars, such as a grid search's ``np.float32`` values, included)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}; got {value!r}")
    return float(value)


def number_or_auto(name: str, value: Any, auto: float, **bounds: Any) -> float:
    """``number(name, value, **bounds)``, or ``auto`` where ``value`` is ``"auto"``."""
    if isinstance(value, str) and value == "auto":
        return auto
    try:
        return number(name, value, **bounds)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("; got", ", or 'auto'; got")) from None


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An int in [low, high], as a Python int (numpy integers, such as ``np.arange``'s,
    included: JSON and ``range`` take them as ints)."""
    ok = _is_int(value)
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{name} must be an int in {rng}; got {value!r}")
    return int(value)


def int_list(name: str, value: Any, *, allow_empty: bool = True) -> list[int]:
    """A list of positive ints such as hidden-layer widths."""
    if _is_int(value):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(_is_int(v) and v > 0 for v in value)
        or (not allow_empty and len(value) == 0)
    ):
        need = "a non-empty list" if not allow_empty else "a list"
        raise ConfigError(f"{name} must be {need} of positive ints; got {value!r}")
    return [int(v) for v in value]


def _is_int(value: Any) -> bool:
    """An int, numpy's included, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def torch_device(value: Any):
    """A ``torch.device`` from ``"auto"`` (cuda when torch sees a GPU, else cpu),
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device; a clear error for a missing GPU or a
    name torch does not know."""
    import torch

    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda'; got {value!r}")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {value!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={value!r} was requested but torch sees no CUDA device")
    return device


def warn_unused(model: type, why: str, **given: Any) -> None:
    """An ``IgnoredSettingWarning`` naming each of ``given`` (name=value) set to other
    than its default in ``model``'s constructor (or a base class's), which ``why`` (a
    choice the model was given) leaves without effect."""
    unused = [
        f"{name}={value!r}" for name, value in given.items() if not _default(model, name, value)
    ]
    if unused:
        it, has = ("it", "has") if len(unused) == 1 else ("them", "have")
        warn(
            f"{model.__name__}: {why}, so {', '.join(unused)} {has} no effect; leave {it} "
            f"out, or choose what uses {it}",
            IgnoredSettingWarning,
        )


def _default(model: type, name: str, value: Any) -> bool:
    for cls in model.__mro__:
        init = cls.__dict__.get("__init__")
        parameter = inspect.signature(init).parameters.get(name) if init else None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            default = parameter.default
            if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
                return list(default) == list(value)
            return bool(default == value)
    return False
