"""Terminal tables of the CLI (``areas list``, ``findings``), drawn by rich.

On a terminal the table fits its width (long text columns wrap or are cut with "…"); into a pipe or a file
it is plain text, no colour codes, wide enough that nothing wraps, so ``grep``/``awk`` see one row a line.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 400


@dataclass(frozen=True)
class Column:
    header: str
    max_width: int | None = None  # longer text is cut with "…" (always on one line: a row stays a row)
    justify: str = "left"


def render_table(columns: Sequence[Column], rows: Iterable[Sequence[object]], *, terminal: bool | None = None) -> str:
    """The rows as a table; ``None`` cells are empty, other values ``str()``-ed with line breaks folded."""
    terminal = sys.stdout.isatty() if terminal is None else terminal
    # Into a pipe: no rule under the header either, so line 1 is the header and every other line a row.
    table = Table(box=box.SIMPLE_HEAD if terminal else None, show_edge=False, pad_edge=False,
                  header_style="bold" if terminal else "")
    for col in columns:
        table.add_column(col.header, max_width=col.max_width, no_wrap=True, overflow="ellipsis",
                         justify=col.justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*("" if v is None else " ".join(str(v).split()) for v in row))
    width = shutil.get_terminal_size((120, 24)).columns if terminal else PIPE_WIDTH
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=terminal, color_system="standard" if terminal else None,
            highlight=False, emoji=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
