"""Plain-text formatting shared by the CLI and the run reports."""

from __future__ import annotations

from typing import Any, Collection, Sequence


def text_table(rows: Sequence[Sequence[Any]], rules_after: Collection[int] = (0,)) -> str:
    """``rows`` (the first is the header) as left-aligned columns two spaces apart, trailing spaces
    stripped, with a rule of dashes under each row whose index is in ``rules_after`` (default: the
    header). Cells are shown with ``str``."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j in rules_after:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
