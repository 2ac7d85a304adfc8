"""ModelCheckpoint whose ``last.ckpt`` really is the latest state, optionally every N steps.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only at steps
where it also saved a top-k ("best") checkpoint, so once the monitored value stops improving
``last.ckpt`` stays at the best step and the end of training is never saved. This subclass saves
``last.ckpt`` at every point where Lightning considers saving (train-epoch end, or validation end),
whether or not the best checkpoint changed, and also every ``every_n_steps`` optimiser steps, so a
long epoch (or a run killed in one) loses at most that many steps. Best checkpoints stay tied to the
monitored value, which only exists after validation. Everything else is Lightning's.

Files are written through :class:`gencli.checkpoints.SafeCheckpointIO` (atomic, never partial); at
set-up, partial files left in the folder by a killed run are removed.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from gencli.errors import ConfigError


class ModelCheckpoint(LightningModelCheckpoint):
    def __init__(self, *args, every_n_steps: int = 0, **kwargs):
        if every_n_steps is None or int(every_n_steps) < 0:
            raise ConfigError(f"callbacks.checkpoint.every_n_steps={every_n_steps} must be >= 0 (0: only at "
                              "validation / epoch ends).")
        super().__init__(*args, **kwargs)
        self.every_n_steps = int(every_n_steps)
        self._step_bucket: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            from gencli.checkpoints import remove_stale_partials

            remove_stale_partials(self.dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every_n_steps <= 0 or self._should_skip_saving_checkpoint(trainer):
            return
        # Buckets rather than step % N == 0: with manual optimisation (GANs) global_step can advance by
        # several optimiser steps per batch and skip the exact multiple.
        bucket = trainer.global_step // self.every_n_steps
        if self._step_bucket is None:
            self._step_bucket = (trainer.global_step - 1) // self.every_n_steps if trainer.global_step else 0
        if bucket > self._step_bucket:
            self._step_bucket = bucket
            self.save_last_now(trainer)

    def save_last_now(self, trainer) -> str:
        """Write ``last.ckpt`` for the current step now (all ranks call this; rank 0 writes). A save at a step
        boundary does not stand for the validation / epoch-end save of the same step: Lightning's "saved at
        this step" mark is put back, so that save (the best checkpoint, last.ckpt with the step's final
        metrics and finished epoch) still happens."""
        saved_before = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_before
        return self.last_model_path

    def _refresh_last(self, trainer) -> None:
        # after a validation / epoch end: rewrite last.ckpt unless Lightning's own save of this step just did
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
