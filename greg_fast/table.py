"""The one plain-text table of the project (plans, run summaries, benchmarks)."""
from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell (right-aligned where listed), a rule of dashes under
    the first row, the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])])
