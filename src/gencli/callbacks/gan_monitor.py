"""GANMonitor: a diversity signal for GAN training, and plain-words warnings when a run goes wrong.

Every ``every_n_steps`` optimiser steps (and at the first batch) it samples a fixed batch of ``n``
images (same seed every time, with the family's default sampling, i.e. the EMA generator; image i from
its own generator, :mod:`gencli.seeds`, so they are images 0..n-1 of ``gencli sample seed=S``) and
logs:

- ``train/diversity``: mean pairwise L2 distance between those samples divided by the same for ``n``
  real training images (taken once, from the first batch). About 1 when the samples vary as much
  as real data; near 0 when the generator makes (almost) the same image for every latent.
- ``train/diversity_gap``: |log(diversity)|, 0 when the spreads match. The GAN configs monitor it
  for the best checkpoint; until ``warmup_steps`` it is logged as +inf so an untrained generator
  is never "best".

Distances are in pixel space: cheap, and enough to see collapse (it is not a quality metric; FID
is). It warns once, through the ``gencli`` logger, when

- the diversity ratio falls below ``collapse_ratio`` after ``warmup_steps`` (mode collapse), and
- the discriminator wins outright for ``d_win_checks`` checks in a row after ``warmup_steps``: the
  fraction of images it classifies right beyond its loss's margin (``d_confident`` from the family's
  training step: p >= 0.99 for bce, the hinge margin for hinge, where its loss gives G almost no
  signal), averaged over the batches since the last check, is at least ``d_win_fraction``. Merely
  ordering every real above every fake is common in healthy DCGAN runs and is not warned about;
  WGAN-GP's critic is meant to be trained to optimality, so it reports no ``d_confident``.

Families opt in with the class attribute ``monitor_diversity = True`` (the GAN does); for others the
callback does nothing, so it sits in the default callbacks at no cost. Only rank 0 warns.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import Tensor

from gencli.nets.modes import eval_mode
from gencli.seeds import PerImageGenerator

log = logging.getLogger(__name__)


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean L2 distance over all pairs i < j of the flattened images."""
    flat = x.detach().float().flatten(1)
    if len(flat) < 2:
        raise ValueError("mean pairwise distance needs at least 2 images")
    return float(torch.pdist(flat).mean())


class GANMonitor(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 200,
        n: int = 64,
        seed: int = 0,
        warmup_steps: int = 1000,
        collapse_ratio: float = 0.4,
        d_win_fraction: float = 0.95,
        d_win_checks: int = 5,
    ):
        if every_n_steps < 1 or n < 2:
            raise ValueError(f"GANMonitor needs every_n_steps >= 1 and n >= 2 (got {every_n_steps}, {n})")
        self.every_n_steps = int(every_n_steps)
        self.n = int(n)
        self.seed = int(seed)
        self.warmup_steps = int(warmup_steps)
        self.collapse_ratio = float(collapse_ratio)
        self.d_win_fraction = float(d_win_fraction)
        self.d_win_checks = int(d_win_checks)
        self.real_distance: float | None = None
        self.history: list[tuple[int, float]] = []  # (step, diversity ratio) at each check
        self.warnings: list[str] = []
        self._bucket = -1
        self._confident_sum = 0.0
        self._confident_count = 0
        self._d_win_streak = 0
        self._d_win_since: int | None = None
        self._warned_collapse = False
        self._warned_d_wins = False
        self._rank_zero = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not getattr(pl_module, "monitor_diversity", False):
            return
        if isinstance(outputs, dict) and outputs.get("d_confident") is not None:
            # summed where it lives (on a GPU, a float() here would make every step wait for the device)
            self._confident_sum = self._confident_sum + outputs["d_confident"].detach()
            self._confident_count += 1
        step = trainer.global_step
        bucket = step // self.every_n_steps
        if bucket <= self._bucket:
            return
        self._bucket = bucket
        ratio = self.diversity(trainer, pl_module, batch)
        if ratio is None:
            return
        gap = abs(math.log(max(ratio, 1e-12))) if step >= self.warmup_steps else math.inf
        pl_module.log("train/diversity", ratio, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log("train/diversity_gap", gap, on_step=True, on_epoch=False)
        self.history.append((step, ratio))
        self._rank_zero = trainer.is_global_zero
        if step >= self.warmup_steps:
            self.check_collapse(step, ratio)
            self.check_d_wins(step)
        self._confident_sum, self._confident_count = 0.0, 0

    @torch.no_grad()
    def diversity(self, trainer, pl_module, batch) -> float | None:
        """Ratio of the samples' mean pairwise distance to the real images' (None where it cannot be taken)."""
        if self.real_distance is None:
            real = batch[0] if isinstance(batch, list | tuple) else batch
            if len(real) < 2:
                return None
            self.real_distance = mean_pairwise_distance(real[: self.n])
        with eval_mode(pl_module):
            samples = pl_module.sample(self.n, generator=PerImageGenerator.for_range(self.seed, 0, self.n))
        return mean_pairwise_distance(samples) / max(self.real_distance, 1e-12)

    def check_collapse(self, step: int, ratio: float) -> None:
        if ratio >= self.collapse_ratio or self._warned_collapse:
            return
        self._warned_collapse = True
        self.warn(
            f"Mode collapse suspected at step {step}: the generator's samples are only {ratio:.0%} as varied as "
            f"real images (mean pairwise distance ratio {ratio:.3f}, warning threshold {self.collapse_ratio:g}), "
            "so it is making nearly the same image for different latents. GANs rarely recover from this on "
            "their own. Try a more stable loss (model=wgan_gp or model=sngan), a lower generator learning rate "
            "(model.g_optimizer.lr), or restart from the best checkpoint (best-*.ckpt, chosen by this ratio)."
        )

    def check_d_wins(self, step: int) -> None:
        if self._confident_count == 0:
            return
        confident = float(self._confident_sum) / self._confident_count
        if confident >= self.d_win_fraction:
            self._d_win_streak += 1
            self._d_win_since = self._d_win_since if self._d_win_since is not None else step
        else:
            self._d_win_streak, self._d_win_since = 0, None
        if self._d_win_streak >= self.d_win_checks and not self._warned_d_wins:
            self._warned_d_wins = True
            self.warn(
                f"The discriminator is winning outright: for {self._d_win_streak} checks in a row (steps "
                f"{self._d_win_since}-{step}) it was sure and right about {confident:.0%} of real and generated "
                f"images (threshold {self.d_win_fraction:.0%}), so the generator gets little useful signal. "
                "Try weakening D or strengthening G: a lower model.d_optimizer.lr or higher model.g_optimizer.lr, "
                "spectral norm (model=sngan), or fewer critic steps (model.n_critic)."
            )

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._rank_zero:
            log.warning(message)
