"""A Rich progress bar over batches that shows images per second (works without a terminal)."""

from __future__ import annotations

from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:7.1f} img/s")


def batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def track_batches(n: int, batch_size: int, description: str) -> Iterator[int]:
    """Yield batch sizes that add up to ``n`` while a bar counts images and shows images/s."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=n)
        for b in batch_sizes(n, batch_size):
            yield b
            progress.advance(task, b)
