"""Progress bars shared by long-running work (training, pipelines): rich, with ETA."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def enabled(flag: bool | None = None) -> bool:
    """Whether to draw progress bars: ``flag`` if given, else not when EDGESLIM_QUIET is set."""
    if flag is not None:
        return flag
    return os.environ.get("EDGESLIM_QUIET", "") in ("", "0")


def progress_bar(*extra_columns: TextColumn, disable: bool = False) -> Progress:
    """A rich progress bar: description, bar, done/total, extra fields, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )
