"""Argument types the benchmarks' command lines share: a bad count is refused by
argparse with a one-line message, before any timing starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aecore.io.atomic import atomic_write_text


def count(text: str) -> int:
    """A positive int (rows, rounds, threads, sizes)."""
    return _int_at_least(text, 1, "a positive int")


def natural(text: str) -> int:
    """A non-negative int (a seed)."""
    return _int_at_least(text, 0, "a non-negative int")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def json_file(text: str) -> str:
    """``--json FILE``: a new file in a folder that exists, checked before any timing
    (results never replace a file, and a run is not lost to a bad path at its end)."""
    path = Path(text)
    if path.exists():
        raise argparse.ArgumentTypeError(
            f"{text} exists: results never replace a file; delete it or choose another name"
        )
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no folder {path.parent} to write it in")
    return text


def write_json(path: str, result: Any) -> None:
    """``result`` as indented JSON, written atomically."""
    atomic_write_text(Path(path), json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def names(allowed: Any) -> Any:
    """A comma-separated list of ``allowed`` names, none unknown and none twice."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        unknown = [t for t in items if t not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(allowed)}"
            )
        if len(set(items)) < len(items):
            raise argparse.ArgumentTypeError(f"a name given twice in {text!r}")
        return items

    return parse


def counts(text: str) -> list[int]:
    """A comma-separated list of positive ints (code sizes); empty for none."""
    return [count(t) for t in text.split(",")] if text.strip() else []


def naturals(text: str) -> list[int]:
    """A non-empty comma-separated list of non-negative ints (seeds)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected at least one seed, got none")
    return [natural(t) for t in text.split(",")]
