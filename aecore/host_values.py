"""Host copies of a module's scalar buffers, read from the device only when they change.

Reading a tensor's value on the host waits for the device: on CUDA, a training step
that reads a counter or flag each time waits for everything queued before it. A buffer
whose identity (``.to``, loading) and version (any in-place change through torch) match
the last read still holds the value that read saw, so it is served from the cache; a
step that changes the buffer through ``fill_buffer`` records the new value, so the next
read needs no wait either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

_CACHE = "_host_values"


class _Cache(dict):
    """Host copies by buffer name. A copy of the module (deepcopy, pickle) starts empty:
    a copied buffer is a new tensor whose version restarts, so an entry carried over
    could match it while holding an older value."""

    def __deepcopy__(self, memo: dict) -> _Cache:
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def _key(buffer: Tensor) -> tuple[Tensor, int] | None:
    # inference tensors keep no version counter: nothing can tell they are unchanged
    return None if buffer.is_inference() else (buffer, buffer._version)


def _remember(module: nn.Module, name: str, buffer: Tensor, value: Any) -> None:
    key = _key(buffer)
    if key is not None:
        module.__dict__.setdefault(_CACHE, _Cache())[name] = (*key, value)


def host_value(module: nn.Module, name: str, cast: Callable[[Tensor], Any]) -> Any:
    """``cast(buffer)`` for ``module``'s buffer ``name``, read again only if it changed."""
    buffer = getattr(module, name)
    seen = module.__dict__.get(_CACHE, {}).get(name)
    # identity first: an inference tensor (no version) is never a remembered one
    if seen is not None and seen[0] is buffer and seen[1] == buffer._version:
        return seen[2]
    value = cast(buffer)
    _remember(module, name, buffer, value)
    return value


def fill_buffer(module: nn.Module, name: str, value: Any) -> None:
    """Set ``module``'s scalar buffer ``name`` to ``value`` and keep it as the host copy."""
    buffer = getattr(module, name)
    buffer.fill_(value)  # a host scalar: the device is not waited for
    _remember(module, name, buffer, value)
