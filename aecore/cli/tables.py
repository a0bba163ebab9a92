"""Plain-text tables and numbers for the command line (and the benchmarks' reports)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, numbers_right: bool = False
) -> str:
    """Columns padded to their widest cell, a dashed rule under the header. With
    ``numbers_right`` every column but the first is right-aligned (numeric tables)."""
    cells = [tuple(str(c) for c in r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        out = [
            c.rjust(w) if numbers_right and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells)])


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], **kwargs) -> None:
    print(format_table(header, rows, **kwargs))


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"
