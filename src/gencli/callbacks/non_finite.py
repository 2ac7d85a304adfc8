"""NonFiniteGuard: stop a run cleanly at the first NaN/inf, before it can spoil a checkpoint.

Works for any family (automatic or manual optimisation). It checks

- every loss, in ``on_before_backward`` (before the gradients and the optimiser step, so the
  weights are still the last good ones);
- every gradient, in ``on_before_optimizer_step`` (a finite loss can still give inf gradients);
  skipped under float16 mixed precision, where the grad scaler expects inf gradients and skips
  those steps itself;
- every checkpoint's weights, in ``on_save_checkpoint``: a state_dict holding NaN/inf is never
  written, so ``last.ckpt`` cannot be overwritten with spoiled weights (Lightning runs this hook
  before the file is opened).

On failure it raises :class:`~gencli.errors.RuntimeFailure` (``gencli train`` prints one paragraph
and exits 1) naming the step, what was non-finite, the likely cause and the last good checkpoint.
If no checkpoint had been written yet and the weights are still finite, it writes them to
``last.ckpt`` in the checkpoint folder first (``save_if_missing``), so there is always something to
resume from or inspect. A family can add its own likely cause with a ``non_finite_hint()`` method
and name the loss it is backpropagating in ``current_loss_name``.

Under DDP a NaN can appear on one rank only (its own shard of the data). Every check is agreed on by
all ranks (an all-reduce of one finite flag), so all ranks stop at the same point with the same
message, naming the rank(s) that saw it; the last-good-checkpoint decision is rank 0's, broadcast, so
a save's collectives are joined by every rank or by none. No rank is left waiting at a barrier.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from gencli.errors import RuntimeFailure

log = logging.getLogger(__name__)


def all_finite(tensors) -> bool:
    """No NaN or inf in any floating-point tensor. One fused op (the largest |value| of each tensor, which is NaN or
    inf exactly when the tensor holds one), not one check per tensor: this runs at every optimiser step."""
    floats = [t.detach() for t in tensors if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return True
    by_dtype: dict = {}
    for t in floats:  # foreach ops take tensors of one dtype and device at a time
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, ord=float("inf")))).all())
               for group in by_dtype.values())


def describe_value(t: Tensor) -> str:
    t = t.detach()
    if torch.isnan(t).any():
        return "NaN"
    return "inf" if (t > 0).any() else "-inf"


class NonFiniteGuard(L.Callback):
    def __init__(self, check_gradients: bool = True, save_if_missing: bool = True):
        self.check_gradients = bool(check_gradients)
        self.save_if_missing = bool(save_if_missing)
        self._batch = None
        self._failing = False

    # ----------------------------------------------------------------- checks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Kept, not checked: whether the input was finite only matters for explaining a failure (likely_cause).
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not self.all_ranks_agree(trainer, finite):
            name = getattr(pl_module, "current_loss_name", None) or "loss"
            where = self.where(trainer, finite)
            what = f"the {name} is {describe_value(loss)}" if not finite else f"the {name} is NaN or inf"
            self.fail(trainer, pl_module, f"{what}{where}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.check_gradients or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all_finite(grads)
        if not self.all_ranks_agree(trainer, finite):
            name = getattr(pl_module, "current_loss_name", None) or "loss"
            self.fail(trainer, pl_module, f"the gradient of the {name} holds NaN or inf values (the loss itself was "
                      f"finite){self.where(trainer, finite)}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._failing:
            return
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if trainer.world_size > 1:
            # Every rank builds the checkpoint and rank 0 writes its own: rank 0's verdict is everyone's.
            bad = trainer.strategy.broadcast(bad, src=0)
        if bad:
            self.fail(trainer, pl_module, f"the weights hold NaN or inf values ({', '.join(bad[:3])}"
                      f"{' ...' if len(bad) > 3 else ''}), so this checkpoint was not written")

    # ----------------------------------------------------------------- DDP
    @staticmethod
    def all_ranks_agree(trainer, finite: bool) -> bool:
        """True when the value is finite on every rank. Under DDP one rank can see a NaN (its own data shard)
        while the others do not; all ranks must stop together, or the others wait forever at the next
        gradient all-reduce, so the decision is all-reduced (one flag per check)."""
        if trainer.world_size <= 1:
            return finite
        return trainer.strategy.reduce_boolean_decision(finite, all=True)

    @staticmethod
    def where(trainer, finite: bool) -> str:
        """' on rank 1' (every rank names the same ones): one more collective, only when the run stops anyway."""
        if trainer.world_size <= 1:
            return ""
        import torch.distributed as dist

        flags: list = [None] * trainer.world_size
        dist.all_gather_object(flags, finite)
        ranks = [str(rank) for rank, ok in enumerate(flags) if not ok]
        return f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} of {trainer.world_size}"

    # ----------------------------------------------------------------- the stop
    def likely_cause(self, trainer, pl_module) -> str:
        batch = self._batch if isinstance(self._batch, list | tuple) else [self._batch]
        if not all_finite(batch):
            return ("the input batch itself holds NaN or inf values, so the data is corrupt: check the files under "
                    "data.root (or the data module)")
        if str(trainer.precision).startswith("16"):
            return ("float16 overflow under hardware.precision=16-mixed: use hardware.precision=bf16-mixed "
                    "or 32-true")
        hint = getattr(pl_module, "non_finite_hint", None)
        if callable(hint):
            return hint()
        return ("the optimisation diverged, usually a learning rate that is too high: lower model.optimizer.lr, "
                "or clip gradients with trainer.gradient_clip_val=1.0")

    def last_good_checkpoint(self, trainer, pl_module) -> Path | None:
        callback = trainer.checkpoint_callback
        existing = next((Path(p) for p in (getattr(callback, "last_model_path", None),
                                           getattr(callback, "best_model_path", None)) if p and Path(p).is_file()), None)
        save = (existing is None and self.save_if_missing and callback is not None and getattr(callback, "dirpath", None)
                and all_finite(pl_module.state_dict().values()))
        if trainer.world_size > 1:
            # All ranks are here together (the decision to fail was all-reduced); rank 0's view of the files
            # decides, so that every rank joins the save's collectives or none does.
            existing, save = trainer.strategy.broadcast((existing, bool(save)), src=0)
        if existing is not None or not save:
            return existing
        path = Path(callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.info("no checkpoint had been written yet; saved the last finite weights to %s", path)
        return path

    def fail(self, trainer, pl_module, what: str) -> None:
        self._failing = True
        step, epoch = trainer.global_step, trainer.current_epoch
        batch = trainer.fit_loop.epoch_loop.batch_idx
        cause = self.likely_cause(trainer, pl_module)
        checkpoint = self.last_good_checkpoint(trainer, pl_module)
        if checkpoint is not None:
            kept = (f"The last good checkpoint is kept: {checkpoint} (sample from it with 'gencli sample "
                    f"ckpt={checkpoint}', or continue it with resume={checkpoint} after the fix).")
        elif trainer.checkpoint_callback is None:
            kept = "No checkpoint was kept: this run has no checkpoint callback."
        else:
            kept = ("No checkpoint had been written yet, and the model's state in memory already holds NaN/inf "
                    "(e.g. batch-norm running statistics updated by the failing forward pass), so there is nothing "
                    "good to keep: start again with the fix.")
        raise RuntimeFailure(
            f"training stopped at step {step} (epoch {epoch}, batch {batch}): {what}. Likely cause: {cause}. {kept}"
        )
