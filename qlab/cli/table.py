"""Plain-text tables for the command line: columns padded to their widest cell, numbers right-aligned.

A few lines of our own rather than a dependency: the base install (aioquic, cryptography, boto3) has
no table library, pandas is only in the `lab` extra, and a terminal table needs no more than this.
"""

from __future__ import annotations

from collections.abc import Sequence

Cell = str | int | float | None


def text(value: Cell, unit: str = "") -> str:
    """One cell: '-' for nothing, numbers without float noise (0.666667 -> 0.67, 82.0 -> 82)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        value = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """Rows under a header line; a column whose every value is a number is right-aligned."""
    cells = [[text(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max(len(line[i]) for line in [list(headers), *cells]) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(c) for c in cells)])


def pairs(rows: Sequence[tuple[str, Cell]]) -> str:
    """A two-column table of names and values (one record)."""
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name.ljust(width)}  {text(value)}".rstrip() for name, value in rows)
