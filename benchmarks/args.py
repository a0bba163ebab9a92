"""Argument types the benchmarks' command lines share: a bad count is refused by
argparse with a one-line message, before any timing starts."""

from __future__ import annotations

import argparse


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
