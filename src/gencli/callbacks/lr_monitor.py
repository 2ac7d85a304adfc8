"""LearningRateMonitor: Lightning's, with rates named after what they train.

Lightning names a rate after its optimiser's class, so a GAN's two Adams log ``lr-Adam`` and ``lr-Adam-1`` and a
reader must know which is which. Here a single optimiser logs ``lr``, and a family that declares
``optimizer_roles`` (the GAN: ``("generator", "discriminator")``, in configure_optimizers' order) logs
``lr/generator`` and ``lr/discriminator``. A scheduler given an explicit name keeps it; parameter groups keep
Lightning's ``/<group>`` suffix.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor


class LearningRateMonitor(LightningLearningRateMonitor):
    def on_train_start(self, trainer, *args, **kwargs) -> None:
        roles = getattr(trainer.lightning_module, "optimizer_roles", None) or ()
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        self._roles = {id(opt): f"lr/{role}" for opt, role in zip(optimizers, roles)}
        if len(optimizers) == 1 and not self._roles:
            self._roles = {id(optimizers[0]): "lr"}
        super().on_train_start(trainer, *args, **kwargs)

    def _check_duplicates_and_update_name(self, optimizer, name, seen_optimizers, seen_optimizer_types,
                                          lr_scheduler_config):
        names = super()._check_duplicates_and_update_name(optimizer, name, seen_optimizers, seen_optimizer_types,
                                                          lr_scheduler_config)
        explicit = lr_scheduler_config is not None and lr_scheduler_config.name is not None
        role = getattr(self, "_roles", {}).get(id(optimizer))
        if explicit or role is None:
            return names
        lightning_name = self._add_prefix(name, type(optimizer), seen_optimizer_types)  # what the names start with
        return [role + n[len(lightning_name):] if n.startswith(lightning_name) else n for n in names]
