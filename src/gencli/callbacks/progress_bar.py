"""Lightning's Rich progress bar, with a readable epoch counter, the run's time left, and real rates in logs."""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import RichProgressBar, Timer
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from rich.progress import Progress, ProgressColumn
from rich.text import Text

from gencli.families.base import logging_step
from gencli.progress import RunETA, format_duration, rate


class StepsPerSecond(ProgressColumn):
    """Lightning's ``it/s`` column, from :func:`gencli.progress.rate`: Lightning's reads Rich's windowed estimate,
    0.00 for an epoch of one batch, and a non-terminal log prints each epoch's row only when it has finished."""

    def __init__(self, style):
        super().__init__()
        self.style = style

    def render(self, task) -> Text:
        return Text(f"{rate(task):.2f}it/s", style=self.style)


class RunTimeLeft(ProgressColumn):
    """``ETA 0:01:05``: the whole run's time left, on the training row only (the bar sets ``text`` and ``task_id``
    after each batch, so rendering, which Rich does in its own thread, reads no trainer state)."""

    def __init__(self):
        super().__init__()
        self.text = ""
        self.task_id = None

    def render(self, task) -> Text:
        return Text(self.text if task.id == self.task_id else "", style="progress.remaining")


class TrainingProgressBar(RichProgressBar):
    """``Epoch 14`` for an open-ended run (``trainer.max_epochs=-1``, stopped by ``max_time`` or
    ``max_steps``), where Lightning's bar would print ``Epoch 14/-2``; otherwise Lightning's own text. Each
    training row ends with the run's time left (``ETA``, :class:`gencli.progress.RunETA`): the pace towards
    ``max_steps`` / ``max_epochs`` and what ``max_time`` leaves, whichever ends the run first."""

    #: the pace of the ETA is that of the last minute: recent enough to follow a run that speeds up after its
    #: first (slower) batches, long enough to span a validation pass
    ETA_WINDOW_S = 60.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta = RunETA(window_s=self.ETA_WINDOW_S)
        self._time_left = RunTimeLeft()
        self._shown_metrics: dict | None = None
        self._metrics_due = True

    def get_metrics(self, trainer, pl_module) -> dict:
        """Lightning's metrics for the bar, read again only on logging steps (families.base.logging_step) and outside
        training batches: the training scalars change only there, and reading them (a tensor -> float each) makes the
        CPU wait for the GPU at every step."""
        if self._metrics_due or self._shown_metrics is None:
            self._shown_metrics = super().get_metrics(trainer, pl_module)
        return self._shown_metrics

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description

    def configure_columns(self, trainer) -> list:
        columns = [StepsPerSecond(self.theme.processing_speed) if isinstance(column, ProcessingSpeedColumn) else column
                   for column in super().configure_columns(trainer)]
        return [*columns, self._time_left]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = run_fractions(trainer.global_step, trainer.max_steps, trainer.current_epoch, batch_idx + 1,
                             trainer.num_training_batches, trainer.max_epochs)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        time_left = timer.time_remaining() if timer is not None else None
        now = time.monotonic()
        self.eta.update(now, done)
        limited = bool(done) or time_left is not None
        self._time_left.text = f"ETA {format_duration(self.eta.remaining(now, time_left))}" if limited else ""
        self._metrics_due = logging_step(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # (creates the row on a resume)
        self._metrics_due = True
        self._time_left.task_id = self.train_progress_bar_id

    def live_progress(self) -> Progress | None:
        """The live Rich display (to add rows under the training bar), or None when it is not running."""
        if self.progress is None or self._progress_stopped or not self.progress.live.is_started:
            return None
        return self.progress


def run_fractions(global_step: int, max_steps: int | None, epoch: int, batches_done: int,
                  batches_per_epoch: float, max_epochs: int | None) -> dict[str, float]:
    """How much of each limit a run has done: ``steps`` (global_step / max_steps) when max_steps is set, ``epochs``
    (epochs and batches done / max_epochs) when max_epochs is set and an epoch's batches are known."""
    done = {}
    if max_steps is not None and max_steps > 0:
        done["steps"] = global_step / max_steps
    if max_epochs is not None and max_epochs > 0 and math.isfinite(batches_per_epoch) and batches_per_epoch > 0:
        done["epochs"] = (epoch + batches_done / batches_per_epoch) / max_epochs
    return done
