"""Classifier: the LightningModule behind gencli's "domain" feature extractor.

Not a generative family: it learns the data set's labels so that its penultimate features can
serve as an offline, CPU-friendly feature space for FID/KID/PRDC (``gencli eval features=domain``).
It trains in two ways with the same loss and augmentation:

- ``gencli train model=classifier data=...`` (a normal Lightning run: checkpoints monitor
  ``val/acc``, mode max); use the checkpoint with ``gencli eval features.ckpt=PATH``;
- on first use by ``gencli eval``/the SampleQuality callback, through the small loop in
  :mod:`gencli.metrics.domain` (no Trainer, so it can run inside another run's callback).

Augmentation is random translation by up to ``shift`` pixels (per image, border-replicated), which
is what lets a LeNet reach 98-99% on MNIST from 9k training images; horizontal flips come from the
data module (``data.random_flip``; CIFAR-10's default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.families.base import log_step, optimizers_from_factories, record_gencli_checkpoint


def random_shift(x: Tensor, shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by an integer number of pixels in [-shift, shift] (edges replicated)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(-shift, shift + 1, (n, 2), generator=generator).to(x.device, x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * offsets[:, 0] / w
    theta[:, 1, 2] = 2 * offsets[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Integer shifts land exactly on pixel centres, so bilinear sampling copies pixels unchanged.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Classifier(L.LightningModule):
    """Not a GenerativeModel: the SampleGrid callback and the sample/eval jobs leave it alone."""

    def __init__(
        self,
        net: nn.Module,
        image_shape: tuple[int, int, int] | list[int],
        shift: int = 2,
        label_smoothing: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/acc",
        monitor_mode: str = "max",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.image_shape = tuple(int(s) for s in image_shape)
        self.shift = int(shift)
        self.label_smoothing = float(label_smoothing)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.run_config: dict | None = None

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)

    # ---- the loss, shared by Lightning training and gencli.metrics.domain's loop
    def check_labels(self, y: Tensor) -> None:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(
                f"the classifier needs integer labels in 0..{self.num_classes - 1}, but the data has labels from "
                f"{int(y.min())} to {int(y.max())} (-1 means an image without a class: data=folder needs one "
                "subfolder per class). Set model.net.num_classes, or use a labelled data set."
            )

    def loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        logits = self.net(random_shift(x, self.shift, generator))
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.check_labels(y)
        loss, logits = self.loss(x, y)
        log_step(self, {"train/loss": loss, "train/acc": (logits.argmax(1) == y).float().mean()},
                 prog_bar=("train/loss",))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        # its cosine schedule counts epochs (conf/model/classifier.yaml)
        return optimizers_from_factories(self, self.optimizer_factory, self.scheduler_factory, interval="epoch")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        val_acc = self.trainer.callback_metrics.get("val/acc") if self._trainer is not None else None
        # the held-out accuracy at save time, recorded in every metrics.json that uses these features
        record_gencli_checkpoint(self, checkpoint, val_acc=float(val_acc) if val_acc is not None else None)
