"""Rich progress bars: images per second over batches, and steps within a batch (works without a terminal).

Rich allows one live display at a time, so nested loops share it: :func:`track_batches` opens the
display, and :func:`track_steps` (e.g. a diffusion sampler's denoising steps inside one batch) adds a
transient row to it. Outside a job's bar (in library use) :func:`track_steps` shows nothing and just
iterates; during training, :func:`show_steps` routes the steps of a sample grid to the training bar (a
terminal) or to log lines (a log file or pipe, where a live display is printed only when it stops).

Rates and times are computed here (:func:`rate`, :class:`RunETA`, :func:`format_duration`) from plain
numbers, so that they can be checked with a fake clock.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
log = logging.getLogger(__name__)
_ACTIVE: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("gencli_progress", default=None)
# what the steps of the current pass belong to ("final grid"), and where they go when there is no live row
_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("gencli_progress_label", default="")
_STEP_LOG: contextvars.ContextVar[StepLog | None] = contextvars.ContextVar("gencli_step_log", default=None)


def rate(task) -> float:
    """Items per second of a Rich task: Rich's recent-window estimate while it runs, the mean over the whole task
    (completed / elapsed) when it has finished or has no estimate yet.

    Rich's ``task.speed`` needs two updates less than 30 s apart and leaves out the first update's items, so it is
    None for a task done in one update (a single batch), or with updates further apart (a diffusion batch): a
    non-terminal log, which prints the row only once it is finished, read ``0.0 img/s`` there."""
    if task.finished and task.finished_time:
        return task.completed / task.finished_time
    if task.speed is not None:
        return task.speed
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else 0.0


def format_duration(seconds: float | None) -> str:
    """``0:01:05`` (h:mm:ss), ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        unit = task.fields.get("unit", "img")
        return Text(f"{rate(task):7.1f} {unit}/s")


class RunETA:
    """The time a training run has left: the pace towards each of its limits (``max_steps``, ``max_epochs``,
    given as the fraction done) over the last ``window_s`` seconds, and the time ``max_time`` leaves; whichever
    ends the run first. Validation and grids between updates count, since they are part of the run's time.

    ``update(now, {"steps": 0.35})`` after each batch; ``remaining(now, time_left)`` -> seconds, or None before
    the pace is known (the first update) or when the run has no limit."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def update(self, now: float, done: dict[str, float]) -> None:
        if self._samples and set(self._samples[-1][1]) != set(done):
            self._samples.clear()  # other limits (a resumed run): the old pace does not apply
        self._samples.append((now, dict(done)))
        # keep two samples at least, so a pace is known even when updates are further apart than the window
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def remaining(self, now: float, time_left: float | None = None) -> float | None:
        estimates = [] if time_left is None else [max(0.0, float(time_left))]
        if len(self._samples) >= 2:
            (t0, first), (t1, last) = self._samples[0], self._samples[-1]
            for limit, fraction in last.items():
                pace = (fraction - first[limit]) / (t1 - t0) if t1 > t0 else 0.0
                if pace > 0:
                    estimates.append(max(0.0, (1.0 - fraction) / pace - (now - t1)))
        return min(estimates) if estimates else None


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


class StepLog:
    """Steps of a pass as log lines, for output that is not a terminal: a line ``final grid: ddim steps 12/50
    (0:00:10 elapsed, about 0:00:32 left)`` each time ``every_s`` seconds have passed since the last one, and a
    closing line for a pass that wrote any; a quicker pass writes nothing."""

    def __init__(self, write: Callable[[str], None] | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write = write or log.info
        self.every_s = float(every_s)
        self.clock = clock
        self.name, self.total, self.done, self.lines = "", 0, 0, 0
        self._start = self._last = 0.0

    def start(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.lines = name, int(total), 0, 0
        self._start = self._last = self.clock()

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if done < self.total and now - self._last >= self.every_s:
            elapsed = now - self._start
            left = elapsed / done * (self.total - done) if done else None
            self.write(f"{self.name} {done}/{self.total} ({format_duration(elapsed)} elapsed, "
                       f"about {format_duration(left)} left)")
            self._last, self.lines = now, self.lines + 1

    def finish(self) -> None:
        if self.lines:
            self.write(f"{self.name} {self.done}/{self.total} in {format_duration(self.clock() - self._start)}")


@contextmanager
def show_steps(label: str, progress: Progress | None = None, step_log: StepLog | None = None) -> Iterator[None]:
    """Show the steps :func:`track_steps` runs inside (a diffusion sampler's) as ``<label>: <sampler> steps``:
    a row of ``progress`` when it is a live display on a terminal (the training bar), else log lines
    (``step_log``, by default a :class:`StepLog` writing to gencli's log). Nothing for a pass without steps."""
    live = progress is not None and progress.live.is_started and progress.console.is_terminal
    tokens = [(_LABEL, _LABEL.set(label)), (_ACTIVE, _ACTIVE.set(progress if live else None)),
              (_STEP_LOG, _STEP_LOG.set(None if live else (step_log or StepLog())))]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def track_steps(steps: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate ``steps``, shown as a transient row under the job's active bar (if there is one), or as
    log lines inside :func:`show_steps` without a terminal."""
    progress, step_log = _ACTIVE.get(), _STEP_LOG.get()
    if progress is None and step_log is None:
        yield from steps
        return
    name = f"{_LABEL.get()}: {description}" if _LABEL.get() else description
    task = progress.add_task(f"  {name}", total=total, unit="step") if progress is not None else None
    if step_log is not None:
        step_log.start(name, total)
    try:
        for done, step in enumerate(steps, 1):
            yield step
            if task is not None:
                progress.advance(task, 1)
            if step_log is not None:
                step_log.update(done)
    finally:
        if task is not None:
            progress.remove_task(task)
        if step_log is not None:
            step_log.finish()
