"""Rich progress bars: images per second over batches, and steps within a batch (works without a terminal).

Rich allows one live display at a time, so nested loops share it: :func:`track_batches` opens the
display, and :func:`track_steps` (e.g. a diffusion sampler's denoising steps inside one batch) adds a
transient row to it. Outside a job's bar (during training, where Lightning's own progress bar is
live, or in library use) :func:`track_steps` shows nothing and just iterates.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from typing import TypeVar

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

T = TypeVar("T")
_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("gencli_progress", default=None)


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        unit = task.fields.get("unit", "img")
        return Text(f"{task.speed or 0:7.1f} {unit}/s")


def batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def track_batches(n: int, batch_size: int, description: str) -> Iterator[int]:
    """Yield batch sizes that add up to ``n`` while a bar counts images and shows images/s."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        token = _ACTIVE.set(progress)
        try:
            task = progress.add_task(description, total=n)
            for b in batch_sizes(n, batch_size):
                yield b
                progress.advance(task, b)
        finally:
            _ACTIVE.reset(token)


def track_steps(steps: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate ``steps``, shown as a transient row under the job's active bar (if there is one)."""
    progress = _ACTIVE.get()
    if progress is None:
        yield from steps
        return
    task = progress.add_task(f"  {description}", total=total, unit="step")
    try:
        for step in steps:
            yield step
            progress.advance(task, 1)
    finally:
        progress.remove_task(task)
