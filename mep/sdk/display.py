"""Readable views of SDK objects: plain text for ``repr`` and HTML tables for Jupyter's ``_repr_html_``."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence


def html_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(cell))}</td>" for cell in row)
                   + "</tr>" for row in rows)
    return f"<table><caption style='text-align:left'>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in (header, *rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def when(unix_time: float) -> str:
    """A Unix time as local date and time; 0 (not yet) as a dash."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time)) if unix_time else "-"
