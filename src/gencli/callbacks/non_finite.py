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

``hardware.host_sync=log`` (the ``gpu_fast`` profile): each of those checks is a GPU->CPU sync, and at 32x32
a GPU waits on them between small steps. Then the checks stay on the device: a step whose loss or gradients are
non-finite is skipped there (torch's fused optimisers take a ``found_inf`` flag, as under GradScaler), and so is
every step after it, so the weights, the EMA and the step counters stay those from before the first bad step
(BatchNorm's running statistics go on following the forward passes until the check; a NaN reaching them is
caught by the checkpoint check below). The flags are read
at logging steps, before every checkpoint and at the end of training; the run then stops with the same paragraph,
naming the first bad step and the step where it was seen. Optimisers without ``found_inf`` support (not
``hardware.optimizer_kernel=fused``) keep the per-step checks, with a warning.

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
    """No NaN or inf in any floating-point tensor. One fused op per dtype (:func:`tensor_norms`), not one check per
    tensor: this runs at every optimiser step."""
    flag = non_finite_flag(tensors)
    return True if flag is None else not bool(flag)


def tensor_norms(group: list[Tensor]) -> list[Tensor]:
    """A norm of each tensor of one dtype that is NaN or inf exactly when the tensor holds a NaN or inf: the L1 norm
    (sum of |x|) where the dtype's range is float32's or wider (finite values would have to sum past 3.4e38, which only
    diverged values reach; on a CPU it is 4x faster than the largest |x|: 0.15 vs 0.59 ms for a 296k-parameter DCGAN
    generator's gradients), the largest |x| for float16, whose sums of ordinary values overflow at 65504."""
    order = float("inf") if group[0].dtype == torch.float16 else 1
    return torch._foreach_norm(group, ord=order)


def non_finite_flag(tensors) -> Tensor | None:
    """Like :func:`all_finite`, but the answer stays on the device: a bool tensor, True where any floating-point
    tensor holds NaN or inf (None when there are none to look at)."""
    floats = [t.detach() for t in tensors if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        return None
    by_dtype: dict = {}
    for t in floats:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    flags = [~torch.isfinite(torch.stack(tensor_norms(group))).all() for group in by_dtype.values()]
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


class DeviceFlags:
    """The NonFiniteGuard's state under ``hardware.host_sync=log``, all on the training device: whether a
    non-finite step has been seen (sticky: every later step is skipped too), the first such step, and what was
    non-finite there."""

    def __init__(self, device: torch.device, world_size: int = 1):
        self.world_size = world_size
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.skip = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float32, device=device)  # the loss at the first bad step
        self.first_loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_bad_now = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_now = torch.zeros((), dtype=torch.float32, device=device)
        #: the names of the losses backpropagated (``current_loss_name``), and which one was bad first
        self.names: list[str] = []
        self.name_now = torch.zeros((), dtype=torch.long, device=device)
        self.first_name = torch.zeros((), dtype=torch.long, device=device)

    def see_loss(self, loss: Tensor, name: str = "loss") -> None:
        if name not in self.names:
            self.names.append(name)
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss).all()
        new = bad & ~self.loss_bad_now
        if loss.numel():
            self.loss_now = torch.where(new, loss.flatten()[0], self.loss_now)
        self.name_now = torch.where(new, torch.full_like(self.name_now, self.names.index(name)), self.name_now)
        self.loss_bad_now = self.loss_bad_now | bad  # (several backwards per step under gradient accumulation)

    def first_loss_name(self) -> str:
        return self.names[int(self.first_name)] if self.names else "loss"

    def see_step(self, grads_bad: Tensor | None, step: int) -> Tensor:
        """Fold this step's flags in; returns the step's skip flag (float 0/1, what fused optimisers read)."""
        now = self.loss_bad_now if grads_bad is None else (self.loss_bad_now | grads_bad)
        first = now & ~self.bad
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_loss = torch.where(first, self.loss_now, self.first_loss)
        self.first_loss_bad = torch.where(first, self.loss_bad_now, self.first_loss_bad)
        self.first_name = torch.where(first, self.name_now, self.first_name)
        self.bad = self.bad | now
        # Under DDP the gradients were all-reduced, so their flag is every rank's; a loss is one rank's own, and a
        # rank skipping alone would leave the ranks' weights apart (its NaN reaches the others' gradients anyway).
        self.skip = self.skip | (now if self.world_size == 1 else (grads_bad if grads_bad is not None else self.skip))
        self.loss_bad_now = torch.zeros_like(self.loss_bad_now)
        return self.skip.float()


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
        self._flags: DeviceFlags | None = None  # set under hardware.host_sync=log

    # ----------------------------------------------------------------- where the checks run
    def on_fit_start(self, trainer, pl_module) -> None:
        self._flags = None
        if getattr(pl_module, "host_sync", "step") != "log":
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        unfit = [type(o).__name__ for o in trainer.optimizers if not getattr(o, "_step_supports_amp_scaling", False)]
        if unfit and not scaler:
            log.warning("hardware.host_sync=log needs optimisers that can skip a step on the device (found_inf), "
                        "and %s cannot: the finite checks run at every step instead. Set "
                        "hardware.optimizer_kernel=fused (Adam, AdamW and SGD have such a kernel).", ", ".join(unfit))
            return
        self._flags = DeviceFlags(pl_module.device, trainer.world_size)

    # ----------------------------------------------------------------- checks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Kept, not checked: whether the input was finite only matters for explaining a failure (likely_cause).
        self._batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._flags is not None:
            from gencli.families.base import logging_step

            if logging_step(trainer):
                self.check_device_flags(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._flags is not None:
            self.check_device_flags(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._flags is not None:
            self.check_device_flags(trainer, pl_module)

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        if self._flags is not None:
            self._flags.see_loss(loss, getattr(pl_module, "current_loss_name", None) or "loss")
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if not self.all_ranks_agree(trainer, finite):
            name = getattr(pl_module, "current_loss_name", None) or "loss"
            where = self.where(trainer, finite)
            what = f"the {name} is {describe_value(loss)}" if not finite else f"the {name} is NaN or inf"
            self.fail(trainer, pl_module, f"{what}{where}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self._flags is not None:
            # float16's GradScaler skips inf steps itself (and sets found_inf): only the loss flag is kept then
            grads = (non_finite_flag(p.grad for group in optimizer.param_groups for p in group["params"])
                     if self.check_gradients and not scaler else None)
            skip = self._flags.see_step(grads, trainer.global_step)
            if not scaler:
                optimizer.found_inf = skip  # read by torch's fused step: no update where 1, decided on the device
            return
        if not self.check_gradients or scaler:
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
        if self._flags is not None:
            self.check_device_flags(trainer, pl_module)  # a skipped step is never saved as a good one
        state = checkpoint.get("state_dict", {})
        bad = [] if all_finite(state.values()) else [
            k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if trainer.world_size > 1:
            # Every rank builds the checkpoint and rank 0 writes its own: rank 0's verdict is everyone's.
            bad = trainer.strategy.broadcast(bad, src=0)
        if bad:
            self.fail(trainer, pl_module, f"the weights hold NaN or inf values ({', '.join(bad[:3])}"
                      f"{' ...' if len(bad) > 3 else ''}), so this checkpoint was not written")

    def check_device_flags(self, trainer, pl_module) -> None:
        """Read the device flags (one sync) and stop the run if a step was non-finite (see DeviceFlags)."""
        flags = self._flags
        bad = bool(flags.bad)
        if self.all_ranks_agree(trainer, not bad):
            return
        first = int(flags.first_step)
        name = flags.first_loss_name()
        if bool(flags.first_loss_bad):
            what = f"the {name} was {describe_value(flags.first_loss)} at step {first}"
        elif bad:
            what = f"the gradient of the {name} held NaN or inf values at step {first} (the loss itself was finite)"
        else:
            what = "a step was NaN or inf"
        skipped = ("; that step and every one after it were skipped on the device (hardware.host_sync=log reads its "
                   "checks at logging steps), so the weights are those from before it")
        self.fail(trainer, pl_module, f"{what}{self.where(trainer, not bad)}{skipped if bad else ''}")

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
