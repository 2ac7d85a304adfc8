"""ModelCheckpoint whose ``last.ckpt`` really is the latest state.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only at steps
where it also saved a top-k ("best") checkpoint, so once the monitored value stops improving
``last.ckpt`` stays at the best step and the end of training is never saved. This subclass saves
``last.ckpt`` at every point where Lightning considers saving (train-epoch end, or validation end),
whether or not the best checkpoint changed. Everything else is Lightning's.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    def _refresh_last(self, trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)
