"""Throughput: how fast training ran, measured by the run itself (images/s and optimiser steps/s after a warm-up).

The first ``warmup_steps`` training batches of a run (or of a resumed run's process) are not timed: they hold
torch.compile's compiling, cuDNN's autotuning, the first allocations and the data loader's start. The clock starts at
the end of batch ``warmup_steps`` and stops at the end of the last training batch (so the final checkpoint and sample
grid are not in it; a run stopped early stops it when training ends); validation loops inside the window (and the
sample metrics that run in them) are paused out (the end-of-epoch one after the last batch is already outside), so the
number is the training loop's own: the forward, backward and optimiser steps plus whatever callbacks and loaders add
per batch (checkpoints and sample grids inside the window are included, as a run pays them). The device is
synchronised only at those boundaries (start, each validation's start and end, the end), never per step, so measuring
costs nothing per step beyond counting the batch's images. A window without positive time (a clock that did not
advance) reports no rate and says why, rather than a number.

``images_per_s`` counts the images of every device (the per-device batch times the number of processes), real images
for a GAN (one batch however many optimiser steps it takes); ``optimizer_steps_per_s`` follows ``trainer.global_step``
(a GAN's generator and discriminator steps both count, as Lightning counts them). The train job writes
:attr:`Throughput.report` into metrics.json (``throughput``) and the callback prints one line at the end of
training, e.g. ``training throughput: 2064.6 images/s, 16.13 optimiser steps/s, 16.13 batches/s (480 batches after
20 warm-up, 29.8 s, validation excluded)``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from gencli.metrics.timing import synchronize

log = logging.getLogger(__name__)


def batch_images(batch: Any) -> int:
    """The number of images in a training batch: the first dimension of its first tensor (an image tensor, an
    (images, labels) pair, a dict, or the index tensor of data kept on the device)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = batch_images(item)
            if n:
                return n
    if isinstance(batch, dict):
        for item in batch.values():
            n = batch_images(item)
            if n:
                return n
    return 0


def last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this training batch is the run's last (max_steps reached, or the last batch of the last epoch)."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
            and batch_idx + 1 >= trainer.num_training_batches)


class Throughput(L.Callback):
    def __init__(self, warmup_steps: int = 20, clock=time.perf_counter):
        # (a negative warm-up is refused by the pre-flight schema: gencli.schema's Throughput range)
        self.warmup_steps = int(warmup_steps)
        self._clock = clock
        #: the measurement once training ended (metrics.json's ``throughput``); None before
        self.report: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._batches = 0  # training batches seen by this process in this fit
        self._images = 0  # images of the timed batches, this device
        self._start: float | None = None
        self._start_step = 0
        self._paused = 0.0  # validation time inside the window
        self._pause_start: float | None = None
        self._stop: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        synchronize(trainer.strategy.root_device)
        return self._clock()

    def _begin(self, trainer: L.Trainer) -> None:
        self._start = self._now(trainer)
        self._start_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.report = None
        if self.warmup_steps == 0:
            self._begin(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._start is not None:
            self._images += batch_images(batch)
            if self._stop is None and last_batch(trainer, batch_idx):
                self._stop = self._now(trainer)  # before the end-of-training checkpoint and sample grid
        elif self._batches == self.warmup_steps:
            self._begin(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # only a validation inside the window is paused out: the one after the last batch (the end of the last
        # epoch) runs once the clock has stopped, and taking it off would shrink the window below zero
        if (self._start is not None and self._stop is None and not trainer.sanity_checking
                and self._pause_start is None):
            self._pause_start = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pause_start is not None:
            self._paused += self._now(trainer) - self._pause_start
            self._pause_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timed = self._batches - self.warmup_steps
        base = {"warmup_batches": self.warmup_steps, "timed_batches": max(timed, 0),
                "devices": trainer.world_size}
        if self._start is None or timed <= 0:
            self.report = {**base, "images_per_s": None, "reason": (
                f"{self._batches} training batches, not more than the {self.warmup_steps} warm-up batches "
                "(callbacks.throughput.warmup_steps)")}
        else:
            self.on_validation_end(trainer, pl_module)  # a validation cut short by the end of training
            stop = self._stop if self._stop is not None else self._now(trainer)  # stopped early: now
            seconds = stop - self._start - self._paused
            steps = trainer.global_step - self._start_step
            if seconds <= 0:
                self.report = {**base, "images_per_s": None, "reason": (
                    f"the {max(timed, 0)} timed batches took {seconds:g} s by the clock ({stop - self._start:g} s "
                    f"from the window's start to its end, {self._paused:g} s of validation inside it): no rate can "
                    "be computed from a window without positive time")}
            else:
                self.report = {
                    **base,
                    "images_per_s": self._images * trainer.world_size / seconds,
                    "optimizer_steps_per_s": steps / seconds,
                    "batches_per_s": timed / seconds,
                    "images": self._images * trainer.world_size,
                    "optimizer_steps": steps,
                    "seconds": seconds,
                    "validation_excluded_s": self._paused,
                }
        if trainer.is_global_zero:
            log.info(self.line(self.report))

    @staticmethod
    def line(report: dict[str, Any] | None) -> str:
        """The one log line for a report (what metrics.json's ``throughput`` says)."""
        if not report:
            return "training throughput: not measured"
        if report.get("images_per_s") is None:
            return f"training throughput: not measured ({report.get('reason')})"
        devices = report.get("devices", 1)
        return (f"training throughput: {report['images_per_s']:.1f} images/s, "
                f"{report['optimizer_steps_per_s']:.2f} optimiser steps/s, {report['batches_per_s']:.2f} batches/s "
                f"({report['timed_batches']} batches after {report['warmup_batches']} warm-up, "
                f"{report['seconds']:.1f} s{', validation excluded' if report.get('validation_excluded_s') else ''}"
                f"{f', {devices} devices' if devices > 1 else ''})")
