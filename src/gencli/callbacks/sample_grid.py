"""SampleGrid: write a PNG of samples from a fixed seed every N steps and at the end of training.

The same seed every time, so successive grids show the same latents as the model learns; image i of
the grid is drawn from image i's own generator (:mod:`gencli.seeds`), so for the same weights it is image
i of ``gencli sample seed=S`` (the callback's ``seed``, ``${seed}`` by default), whatever either's batch
size. Families
with an encoder also get a reconstruction grid (validation inputs on odd rows, reconstructions
below them). Only rank 0 writes. Modules that are not a GenerativeModel (the domain classifier,
``model=classifier``) have nothing to sample, so the callback skips them.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from gencli.callbacks.progress_bar import TrainingProgressBar
from gencli.families.base import GenerativeModel
from gencli.io import auto_scale, image_grid, save_image_grid
from gencli.loggers import log_image
from gencli.nets.modes import eval_mode
from gencli.progress import show_steps
from gencli.seeds import PerImageGenerator


class SampleGrid(L.Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 500, n: int = 64, seed: int = 0, reconstructions: bool = True):
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.n = int(n)
        self.seed = int(seed)
        self.reconstructions = reconstructions
        self.last_written: Path | None = None
        self._written_bucket = 0

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module, name: str) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, GenerativeModel):
            return
        # a diffusion model's grid takes many sampler steps: shown under the training bar, or logged without a terminal
        label = "final grid" if name == "final" else f"grid at step {trainer.global_step}"
        bar = getattr(trainer, "progress_bar_callback", None)
        live = bar.live_progress() if isinstance(bar, TrainingProgressBar) else None
        with eval_mode(pl_module), show_steps(label, live):
            images = pl_module.sample(self.n, generator=PerImageGenerator.for_range(self.seed, 0, self.n))
            scale = auto_scale(images.shape[-1])
            # a conditional model draws image i as class i % K (class-balanced): one column per class
            columns = pl_module.num_classes if getattr(pl_module, "conditional", False) else None
            self.last_written = save_image_grid(self.dirpath / f"{name}.png", images, nrow=columns, scale=scale)
            # TensorBoard, W&B and MLflow show the same grid beside the curves (gencli.loggers knows each one's API)
            if trainer.loggers:
                grid = (image_grid(images, nrow=columns) + 1) / 2
                for logger in trainer.loggers:
                    log_image(logger, "samples", grid, trainer.global_step)
            if self.reconstructions and pl_module.has_encoder and trainer.datamodule is not None:
                x, y = next(iter(trainer.datamodule.val_dataloader()))
                x = x[: min(32, self.n)].to(pl_module.device)
                own = {"labels": y[: len(x)].to(pl_module.device)} if getattr(pl_module, "conditional", False) else {}
                pairs = torch.stack([x, pl_module.reconstruct(x, **own)], 1).flatten(0, 1)
                save_image_grid(self.dirpath / f"{name}_reconstructions.png", pairs, nrow=16, scale=scale)
                for logger in trainer.loggers:
                    log_image(logger, "reconstructions", (image_grid(pairs, nrow=16) + 1) / 2, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Bucket by step count rather than testing step % N == 0: with manual optimisation (GANs)
        # global_step can advance by several optimiser steps per batch and skip the exact multiple.
        step = trainer.global_step
        if self.every_n_steps > 0 and step // self.every_n_steps > self._written_bucket:
            self._written_bucket = step // self.every_n_steps
            self.write(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, "final")
