"""OptunaPruning: report the optimised metric to this job's Optuna trial, and stop the run when it is pruned.

Active only in a job of gencli's Optuna search (``hparams_search=<family>_optuna``), whose sweeper
passes the trial number as ``sweep.trial=N`` (:mod:`gencli.optuna_search`); the study's storage and
name come from the sweep's Hydra config. After every validation (and, for families without one,
every training epoch, after the sample-quality callback has logged its FID/KID) it reports
``monitor`` at step = epoch and asks the study's pruner; a pruned run stops like an early-stopped one
(checkpoints and metrics.json are written, ``"status": "pruned"``), and the sweeper records the trial
as PRUNED. Under DDP rank 0 reports and asks; every rank gets the answer.
"""

from __future__ import annotations

import logging
import math

import lightning as L

log = logging.getLogger(__name__)


class OptunaPruning(L.Callback):
    def __init__(self, trial: int | None = None, monitor: str | None = None):
        self.trial_number = None if trial is None else int(trial)
        self.monitor = monitor
        self.trial = None
        self.pruned = False
        self._reported_epoch = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.trial_number is None or self.monitor is None or not trainer.is_global_zero:
            return
        from hydra.core.hydra_config import HydraConfig

        sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else {}
        if not sweeper.get("storage"):
            log.warning("sweep.trial=%s but the sweep has no Optuna storage: nothing to report to, no pruning",
                        self.trial_number)
            return
        self.trial = load_trial(sweeper, self.trial_number)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.report(trainer)  # families without validation (GANs) log their sample quality here

    def report(self, trainer) -> None:
        # Every rank takes the same path: whether this epoch was reported is rank 0's answer, broadcast with the
        # pruning decision, so no rank enters a broadcast that the others skip.
        if self.trial_number is None or self._reported_epoch == trainer.current_epoch:
            return
        reported, prune = False, False
        if trainer.is_global_zero and self.trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                reported = True
                self.trial.report(float(value), step=trainer.current_epoch)
                prune = self.trial.should_prune()
        if trainer.world_size > 1:
            reported, prune = trainer.strategy.broadcast((reported, prune), src=0)
        if reported:
            self._reported_epoch = trainer.current_epoch
        if prune:
            self.pruned = True
            trainer.should_stop = True
            log.info("Optuna pruned trial %d after epoch %d (%s = %s): stopping this run", self.trial_number,
                     trainer.current_epoch, self.monitor, trainer.callback_metrics.get(self.monitor))


def load_trial(sweeper, number: int):
    """Trial ``number`` of the study that the sweep's config (``hydra.sweeper``) names, judged by its pruner.

    The pruner is not stored with the study: a study loaded without it would judge with Optuna's default
    MedianPruner (5 start-up trials, no warm-up), not the one the search configured, so it is built here
    from the same config (``pruner: null``: never prune).
    """
    import optuna

    config = sweeper.get("pruner")
    target = str(config.get("_target_", "")) if config else ""
    module, _, name = target.rpartition(".")
    cls = getattr(optuna.pruners, name, None) if module == "optuna.pruners" else None
    if config and not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        # the sweep's config reaches each job (through a pickle under submitit): build only Optuna's own pruners
        from gencli.errors import ConfigError

        raise ConfigError(f"hydra.sweeper.pruner._target_={target!r} is not one of Optuna's pruners: use "
                          "optuna.pruners.MedianPruner (or another class of optuna.pruners), or pruner: null.")
    settings = {k: v for k, v in config.items() if k != "_target_"} if config else {}
    nested = [k for k, v in settings.items() if not isinstance(v, int | float | str | bool | type(None))]
    if nested:
        from gencli.errors import ConfigError

        raise ConfigError(f"hydra.sweeper.pruner.{nested[0]} must be a plain value (a number, string or null): a "
                          "pruner is built from plain settings only, never from nested configs.")
    pruner = cls(**settings) if config else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=sweeper.get("study_name"), storage=sweeper.get("storage"), pruner=pruner)
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(number))
    return optuna.trial.Trial(study, trial_id)
