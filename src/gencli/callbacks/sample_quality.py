"""SampleQuality: FID and KID of the model's samples during training, in the domain feature space.

Every ``every_n_epochs`` epochs (0: never, the default) it draws ``n`` samples with a fixed seed,
streams them through the feature extractor (``features``, the domain classifier by default) and logs

- ``val/fid_domain`` and ``val/kid_domain`` (names follow the extractor: ``val/fid`` for Inception),

against the data module's ``reference_split`` (val), whose statistics come from the same cache as
``gencli eval`` (and the classifier is trained on first use, cached, just as there). The values are
logged at every validation (or, for families without a validation loop, every training epoch end),
repeating the last measurement between measurements and +inf before the first, so they can be the
checkpoint monitor and the ``optimized_metric`` a sweep optimises:

    gencli train ... callbacks.sample_quality.every_n_epochs=1 \
        model.monitor=val/fid_domain model.monitor_mode=min

Under DDP the ranks share the work: of the ``n`` images, rank ``r`` of ``W`` samples the contiguous
block ``n*r//W .. n*(r+1)//W - 1`` (image ``i`` has its own (seed, i) generator, so it is the same
image whatever ``W``; ``n`` need not be a multiple of ``W``) and extracts its features, and the
metric states are combined by torchmetrics' distributed sync (FID's sums summed, KID's features
gathered in image order; the cached real side is held by rank 0 alone, so it counts once); see
:mod:`gencli.metrics.sample_metrics`. Every rank then computes the same values, equal to a
single-process measurement of the same ``n`` samples up to float rounding, and logs them; all ranks
enter the same collectives in the same order, and an error on one rank is raised on all of them. On
first use rank 0 trains the domain classifier and computes the reference statistics, writing the
caches, while the other ranks wait, then read them (``cache_dir`` must be one folder that every
rank sees). The model's random state and the training RNG are untouched (sampling uses its own
generators; the classifier trains under ``fork_rng``). Numbers from a few hundred samples are biased upwards (FID especially): they
rank checkpoints of one run; use ``gencli eval`` with ``n`` in the thousands for reporting.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from gencli.families.base import GenerativeModel
from gencli.metrics.sample_metrics import (
    FIDMetric,
    KIDMetric,
    Shard,
    metric_suffix,
    prepare_features_and_reference,
    run_sample_metrics,
)
from gencli.metrics.sources import ModelSource
from gencli.nets.modes import eval_mode

log = logging.getLogger(__name__)


class SampleQuality(L.Callback):
    def __init__(
        self,
        features,
        every_n_epochs: int = 0,
        n: int = 500,
        seed: int = 0,
        batch_size: int = 250,
        reference_split: str = "val",
        reference_n: int | None = None,
        kid_subsets: int = 50,
        kid_subset_size: int = 250,
        cache_dir: str | None = None,
        cache: bool = True,
        prefix: str = "val/",
    ):
        if every_n_epochs < 0 or n < 2 or batch_size < 1:
            raise ValueError(f"SampleQuality needs every_n_epochs >= 0, n >= 2, batch_size >= 1 "
                             f"(got {every_n_epochs}, {n}, {batch_size})")
        self.features = features
        self.every_n_epochs = int(every_n_epochs)
        self.n = int(n)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.reference_split = reference_split
        self.reference_n = reference_n
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.cache_dir = cache_dir
        self.cache = bool(cache)
        self.prefix = prefix
        self.last: dict[str, float] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._logged_epoch = -1

    @property
    def names(self) -> tuple[str, str]:
        suffix = metric_suffix(self.features)
        return f"{self.prefix}fid{suffix}", f"{self.prefix}kid{suffix}"

    def active(self, trainer, pl_module) -> bool:
        return self.every_n_epochs > 0 and isinstance(pl_module, GenerativeModel) and not trainer.sanity_checking

    def due(self, trainer) -> bool:
        epoch = trainer.current_epoch
        last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return (epoch + 1) % self.every_n_epochs == 0 or last_epoch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.active(trainer, pl_module):
            self.measure_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # families without a validation loop (GANs): ModelCheckpoint saves at train-epoch end
        if self.active(trainer, pl_module) and self._logged_epoch != trainer.current_epoch:
            self.measure_and_log(trainer, pl_module)

    def measure_and_log(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if self._logged_epoch != epoch and self.due(trainer):
            values = self.measure(trainer, pl_module)  # every rank: its share, then the same combined values
            self.last = values
            self.history.append((epoch, values))
        self._logged_epoch = epoch
        values = self.last or {"fid": math.inf, "kid": math.inf}
        fid_name, kid_name = self.names
        pl_module.log(fid_name, float(values["fid"]), prog_bar=True, on_step=False, on_epoch=True, sync_dist=False)
        pl_module.log(kid_name, float(values["kid"]), on_step=False, on_epoch=True, sync_dist=False)

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, float]:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("SampleQuality needs the trainer's data module (trainer.fit(model, datamodule=...)).")
        shard = Shard.of_process_group(pl_module.device) if trainer.world_size > 1 else None
        with eval_mode(pl_module):
            ref = prepare_features_and_reference(self.features, datamodule, pl_module.device, self.reference_split,
                                                 self.reference_n, self.cache_dir, self.batch_size, self.cache, shard)
            fid, kid = FIDMetric(), KIDMetric(subsets=self.kid_subsets, subset_size=self.kid_subset_size)
            source = ModelSource(pl_module, self.n, self.seed)
            out = run_sample_metrics([fid, kid], source, self.features, ref, self.batch_size, self.seed,
                                     description=f"sample quality (epoch {trainer.current_epoch})", shard=shard)
        suffix = metric_suffix(self.features)
        values = {"fid": out["values"][id(fid)][f"fid{suffix}"], "kid": out["values"][id(kid)][f"kid{suffix}"]}
        where = "" if shard is None else f", {out['n_here']} of them on rank {shard.rank} of {shard.world_size}"
        log.info("epoch %d: %s=%.4g %s=%.4g (%d samples%s, %.0f images/s)", trainer.current_epoch, self.names[0],
                 values["fid"], self.names[1], values["kid"], self.n, where, out["images_per_second"])
        return values
