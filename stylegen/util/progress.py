"""Rich progress bar for long runs (img/s and ETA), or nothing when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def embed_progress(total: int, enabled: bool = True, label: str = "embedding",
                   unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar on stderr with ``unit``/s and ETA when enabled."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("[progress.data.speed]{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("embed", total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:6.1f} {unit}/s" if speed else "")

        yield advance
