"""What the benchmark scripts share: composing the real configs, a training clock, and a Markdown table."""

from __future__ import annotations

import time

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gencli.config import CONF_DIR


def compose_train(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, as ``gencli train`` composes it."""
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name="train", overrides=overrides)


class Clock(L.Callback):
    """Wall time from the end of batch ``warmup`` to the end of training, synchronising CUDA."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.stop, self.batches = warmup, None, None, 0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.batches == self.warmup:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.stop = time.perf_counter()


def bench_trainer(device: str, precision: str, clock: Clock, strategy=None) -> L.Trainer:
    """A bare Lightning Trainer for one epoch over in-memory data: no logging, checkpoints or progress bar.
    ``strategy``: Lightning's (None: "auto"), e.g. a one-device DDPStrategy to measure what the DDP wrapper costs."""
    return L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision, max_steps=-1,
        strategy=strategy if strategy is not None else "auto",
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[clock], num_sanity_val_steps=0, limit_val_batches=0,
    )


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
