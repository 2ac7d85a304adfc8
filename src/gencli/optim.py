"""Learning-rate schedules that the configs name as ``model.scheduler`` (stepped every optimiser step)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from gencli.errors import ConfigError


class LinearWarmup(LRScheduler):
    """lr * min(1, (step + 1) / warmup_steps): the linear warm-up of DDPM (Ho et al. 2020: 5000 steps), then constant."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 5000, last_epoch: int = -1):
        if int(warmup_steps) < 0:
            raise ConfigError(f"model.scheduler.warmup_steps={warmup_steps} must be >= 0 (0: no warm-up).")
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, (self.last_epoch + 1) / self.warmup_steps)

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor() for base_lr in self.base_lrs]
