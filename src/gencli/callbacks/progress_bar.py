"""Lightning's Rich progress bar, with a readable epoch counter for runs stopped by time or steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class TrainingProgressBar(RichProgressBar):
    """``Epoch 14`` for an open-ended run (``trainer.max_epochs=-1``, stopped by ``max_time`` or
    ``max_steps``), where Lightning's bar would print ``Epoch 14/-2``; otherwise Lightning's own text."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description
