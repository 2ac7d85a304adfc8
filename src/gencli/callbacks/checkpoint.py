"""ModelCheckpoint whose ``last.ckpt`` really is the latest state, optionally every N steps.

Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only at steps
where it also saved a top-k ("best") checkpoint, so once the monitored value stops improving
``last.ckpt`` stays at the best step and the end of training is never saved. This subclass saves
``last.ckpt`` at every point where Lightning considers saving (train-epoch end, or validation end),
whether or not the best checkpoint changed, and also every ``every_n_steps`` optimiser steps, so a
long epoch (or a run killed in one) loses at most that many steps. Best checkpoints stay tied to the
monitored value, which only exists after validation. Everything else is Lightning's.

Files are written through :class:`gencli.checkpoint_io.SafeCheckpointIO` (atomic, never partial); at
set-up, partial files left in the folder by a killed run are removed.

Restored state is data, checked like config. On resume Lightning hands this callback the state stored in
the checkpoint (``last_model_path``, ``best_model_path``, ``best_k_models``, ``kth_best_model_path``,
``dirpath``), and later removes the "previous" last and k-th best files by those paths; a checkpoint may come
from a stranger. So :meth:`ModelCheckpoint.load_state_dict` rebuilds that state from the run's own
checkpoints folder (the ``dirpath`` of the run's config, never the file's): a stored path is kept only if its
real path lies in that folder, passes through no symbolic link, has gencli's naming for its role (``last``
for ``last_model_path``, the ``filename`` template for the best ones) and is a regular file there; the scores
of the best files kept are kept (when they are numbers), and the best and k-th best are recomputed from them.
Everything else is dropped with a warning naming it. At set-up the folder is declared to the checkpoint I/O
(:class:`gencli.checkpoints.CheckpointFolder`), which removes a file only if this run lineage wrote it there.
The other callbacks' restored state holds no paths (the training random state is numbers).
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from gencli.checkpoints import CheckpointFolder
from gencli.errors import ConfigError

log = logging.getLogger(__name__)

NEVER = re.compile(r"(?!)")


def checkpoint_naming(template: str | None, auto_insert_metric_name: bool = True, last: str = "last",
                      join: str = "-", equals: str = "=", extension: str = ".ckpt") -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The names (relative to the checkpoints folder) Lightning's ModelCheckpoint gives its files, as two regular
    expressions: (the ``filename`` template's: the best checkpoints, the ``last`` template's). They mirror
    ``ModelCheckpoint.format_checkpoint_name``: each ``{metric:spec}`` is a value (``metric=value`` with
    ``auto_insert_metric_name``), an optional ``-vN`` version, then ``.ckpt``; a best name is never a last name."""

    def pattern(text: str | None) -> re.Pattern[str]:
        text = text or "{epoch}" + join + "{step}"
        parts = []
        try:
            for literal, field, _, _ in string.Formatter().parse(text):
                parts.append(re.escape(literal))
                if field is not None:
                    parts.append((re.escape(field + equals) if auto_insert_metric_name else "") + r"[^/]+?")
        except ValueError:  # not a template Lightning could format either
            return NEVER
        return re.compile("(?:" + "".join(parts) + ")(?:" + re.escape(join) + r"v\d+)?" + re.escape(extension))

    last_names = pattern(last)
    # a best checkpoint never takes last's name (with filename="{epoch}" and no metric names, "last.ckpt" would fit)
    return re.compile(f"(?!(?:{last_names.pattern})$)(?:{pattern(template).pattern})"), last_names


class ModelCheckpoint(LightningModelCheckpoint):
    def __init__(self, *args, every_n_steps: int = 0, **kwargs):
        if every_n_steps is None or int(every_n_steps) < 0:
            raise ConfigError(f"callbacks.checkpoint.every_n_steps={every_n_steps} must be >= 0 (0: only at "
                              "validation / epoch ends).")
        given = kwargs.get("dirpath", args[0] if args else None)
        super().__init__(*args, **kwargs)
        #: the folder as configured (Lightning keeps its real path: a link there would lead out of the run folder)
        self.given_dirpath = os.path.abspath(os.path.expanduser(str(given))) if given else None
        self.every_n_steps = int(every_n_steps)
        self._step_bucket: int | None = None
        self.best_naming, self.last_naming = checkpoint_naming(self.filename, self.auto_insert_metric_name,
                                                               self.CHECKPOINT_NAME_LAST, self.CHECKPOINT_JOIN_CHAR,
                                                               self.CHECKPOINT_EQUALS_CHAR, self.FILE_EXTENSION)
        #: the run's checkpoints folder, from the config's dirpath (set at set-up, before any state is restored)
        self.folder: CheckpointFolder | None = None
        self._reports = True  # rank 0 warns about dropped state and kept files; the other ranks do the same quietly
        self._strategy = None  # rank 0's rebuilt state goes to every rank (they must agree on what to save)
        self._guarded = False  # the trainer's checkpoint I/O is gencli's: it records saves and guards removals

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._reports = trainer.is_global_zero
        self._strategy = trainer.strategy
        if self.dirpath and _is_local_file_protocol(str(self.dirpath)):
            if self.given_dirpath and os.path.islink(self.given_dirpath):
                raise ConfigError(
                    f"the checkpoints folder {self.given_dirpath} is a symbolic link (to "
                    f"{os.path.realpath(self.given_dirpath)}): this run would resume from and overwrite the checkpoints "
                    "of whatever folder it leads to, without that run's lock, so it is refused. Remove the link (rm "
                    f"{self.given_dirpath}) or set callbacks.checkpoint.dirpath= to a real folder.")
            either = re.compile(f"(?:{self.best_naming.pattern})|(?:{self.last_naming.pattern})")
            self.folder = CheckpointFolder(self.given_dirpath or self.dirpath, either)
            io = trainer.strategy.checkpoint_io
            while not hasattr(io, "folder") and hasattr(io, "checkpoint_io"):  # a wrapping I/O (asynchronous saves)
                io = io.checkpoint_io
            if hasattr(io, "folder"):  # gencli's SafeCheckpointIO: it records every save and guards every removal
                io.folder = self.folder
                self._guarded = True
        if trainer.is_global_zero and self.dirpath:
            from gencli.checkpoints import remove_stale_partials

            remove_stale_partials(self.dirpath)

    # ------------------------------------------------------------------ restored state, checked
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take from the stored state only what points at this run's own checkpoints (see the module docstring).

        Lightning's own version trusts the stored paths whenever the stored ``dirpath`` equals this one (or is
        missing), and compares paths as text; here nothing in the file is trusted as a path."""
        state = state_dict if isinstance(state_dict, dict) else {}
        folder = self.folder or (CheckpointFolder(self.dirpath, NEVER) if self.dirpath else None)
        dropped: list[tuple[str, Any, str, re.Pattern[str] | None]] = []

        def kept(key: str, value: Any, naming: re.Pattern[str]) -> str:
            if value is None or value == "":
                return ""
            if not isinstance(value, str):
                dropped.append((key, value, "it is not a path", None))
                return ""
            if folder is None:
                dropped.append((key, value, "this run has no local checkpoints folder", None))
                return ""
            name, why = folder.name_of(value, naming)
            if name is None:
                dropped.append((key, value, why, naming if why.startswith("it lies outside") else None))
                return ""
            return os.path.join(str(folder.folder), name)

        self.last_model_path = kept("last_model_path", state.get("last_model_path"), self.last_naming)
        best_k: dict[str, torch.Tensor] = {}
        stored_k = state.get("best_k_models")
        if isinstance(stored_k, dict):
            for path, value in stored_k.items():
                score = _score(value)
                if score is None:
                    dropped.append((f"best_k_models[{_short(path)!r}]", value, "its score is not a number", None))
                    continue
                if path := kept("best_k_models", path, self.best_naming):
                    best_k[path] = score
        elif stored_k is not None:
            dropped.append(("best_k_models", stored_k, "it is not a mapping of paths to scores", None))
        best = kept("best_model_path", state.get("best_model_path"), self.best_naming)
        kth = kept("kth_best_model_path", state.get("kth_best_model_path"), self.best_naming)
        if best and self.monitor is not None and best not in best_k:
            dropped.append(("best_model_path", best, "it is not one of the kept best_k_models", None))
        if kth and kth not in best_k:
            dropped.append(("kth_best_model_path", kth, "it is not one of the kept best_k_models", None))

        if self._strategy is not None and getattr(self._strategy, "world_size", 1) > 1:
            # the files were looked at on rank 0's file system; every rank must take the same decisions from here on
            last, best_k, best, dropped = self._strategy.broadcast((self.last_model_path, best_k, best, dropped), src=0)
            self.last_model_path = last

        # the best and the k-th best follow from the entries kept, as Lightning computes them after a save
        self.best_k_models = best_k
        if best_k:
            better, worse = (min, max) if self.mode == "min" else (max, min)
            self.best_model_path = better(best_k, key=best_k.get)
            self.best_model_score = best_k[self.best_model_path]
            self.kth_best_model_path = worse(best_k, key=best_k.get)
            self.kth_value = best_k[self.kth_best_model_path]
        else:
            # without a monitor Lightning keeps the latest checkpoint as best_model_path, outside best_k_models
            self.best_model_path = best if self.monitor is None else ""
            self.best_model_score = _score(state.get("best_model_score")) if self.best_model_path else None
            self.kth_best_model_path = ""
        self.current_score = _score(state.get("current_score"))
        if dropped and self._reports:
            self._report_dropped(state.get("dirpath"), folder, dropped)

    def _report_dropped(self, stored_dir: Any, folder: CheckpointFolder | None,
                        dropped: list[tuple[str, Any, str, re.Pattern[str] | None]]) -> None:
        here = str(folder.folder) if folder is not None else str(self.dirpath)
        if isinstance(stored_dir, str) and stored_dir and not _same_text(stored_dir, here) and all(
                naming is not None and _named_in(value, stored_dir, naming) for _, value, _, naming in dropped):
            # resume=PATH of another run's checkpoint: that run's best / last files stay where they are
            log.info("continuing in %s: the checkpoints the resumed run kept in %s are not tracked by this run (and "
                     "never removed by it)", here, stored_dir)
            return
        listed = "; ".join(f"{key}={_short(value)} ({why})" for key, value, why, _ in dropped[:8])
        more = f"; and {len(dropped) - 8} more" if len(dropped) > 8 else ""
        log.warning("the checkpoint this run resumes from names files that are not this run's own checkpoints, so "
                    "they were dropped from the restored state of the checkpoint callback: %s%s. gencli keeps track "
                    "of (and removes) only checkpoints it wrote in this run's checkpoints folder %s; the files named "
                    "are left alone.", listed, more, here)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not self._guarded and trainer.is_global_zero and self.folder is not None and os.path.isfile(filepath):
            self.folder.record(filepath)  # another I/O than gencli's (which records every save itself)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        """Lightning removes the previous last / k-th best file here. gencli's I/O guards every removal
        (:meth:`gencli.checkpoints.CheckpointFolder.remove`); with another I/O (a library user's Trainer) the
        folder's guard removes the file itself, so no removal goes unchecked."""
        if self._guarded:
            super()._remove_checkpoint(trainer, filepath)
        elif trainer.is_global_zero:
            if self.folder is not None:
                self.folder.remove(filepath)
            else:
                log.warning("left %s in place instead of removing it as an old checkpoint: this run has no local "
                            "checkpoints folder, so gencli cannot tell whether it wrote the file.", filepath)

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


def _score(value: Any) -> torch.Tensor | None:
    """A stored monitor value as Lightning keeps it (a 0-d float tensor), or None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            return None
        value = value.detach().reshape(()).to("cpu").float()
        return None if bool(torch.isnan(value)) else value
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return torch.tensor(float(value))
    return None


def _same_text(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _named_in(path: str, folder: str, naming: re.Pattern[str]) -> bool:
    """Whether ``path`` is, as text (``..`` folded, no link followed), a checkpoint named as gencli names them
    directly in ``folder``: what a genuine checkpoint of another run folder holds."""
    path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return os.path.dirname(path) == folder and bool(naming.fullmatch(os.path.basename(path)))


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
