"""Public functions answer a misspelt keyword with the closest one they take, instead
of Python's bare "unexpected keyword argument"."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from aecore.errors import KeywordError

F = TypeVar("F", bound=Callable[..., Any])

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def checked_keywords(function: F) -> F:
    """Wrap ``function`` so an unknown keyword raises a KeywordError naming the closest
    known one. Functions that take ``**kwargs`` are returned as they are."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return function
    names = [p.name for p in parameters if p.kind in _NAMED and p.name != "self"]
    known = frozenset(names)
    label = function.__qualname__

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if kwargs and not known.issuperset(kwargs):
            key = next(key for key in kwargs if key not in known)
            raise KeywordError(
                f"{label}() takes no keyword {key!r}{did_you_mean(key, names)} "
                f"(its keywords: {', '.join(names)})"
            )
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
