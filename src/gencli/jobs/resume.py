"""Which checkpoint ``gencli train`` continues from: ``resume=PATH``, ``resume=auto`` or none.

- ``resume=PATH`` continues from that file, read by gencli's safe loader (local files only,
  ``weights_only``, the allow-list check of its config). It must hold the same model as the command
  builds, and must not already have reached the run's limits (``trainer.max_steps``/``max_epochs``/
  ``max_time``): continuing it would train nothing, so that is a usage error telling which limit to raise.
- ``resume=auto`` looks in this run's own checkpoint folder (a fixed ``run_name=`` or ``hydra.run.dir=``
  makes re-running the same command find it) for the newest checkpoint that loads; unreadable ones are
  skipped with a warning, never picked. No checkpoint: a fresh start. A run that already finished: exit 0
  with a note and nothing trained, so a script that re-runs the command until it succeeds is safe.
- no ``resume``: the checkpoint folder must be empty (or absent), so a second run with the same name
  never overwrites the first one's checkpoints by accident.

Lightning itself then restores the model, optimisers, LR schedules, loop counters and callback states
(through :class:`gencli.checkpoints.SafeCheckpointIO`, which hands it the checkpoint loaded here);
:class:`gencli.callbacks.TrainingRandomState` restores the random state and
:class:`gencli.data.base.EpochSampler` the position in the epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gencli.checkpoints import checkpoint_path, find_resumable, load_checkpoint
from gencli.errors import ConfigError, RuntimeFailure

log = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    path: Path
    checkpoint: dict[str, Any]
    #: Set when the checkpoint already meets the run's limits under resume=auto: why nothing is trained.
    complete: str | None = None

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("global_step") or 0)

    def check_matches(self, model) -> None:
        """The checkpoint must hold the model the command builds: the same class and tensor shapes."""
        stored = self.checkpoint["gencli"]
        family = stored.get("family")
        if family and family != type(model).__name__:
            raise ConfigError(
                f"resume={self.path} holds a {family}, but this command builds a {type(model).__name__}. Resume with the "
                f"model settings the run was started with (its config is in the checkpoint and in the run's .hydra/ "
                f"folder), or start a new run without resume=."
            )
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in self.checkpoint["state_dict"].items()}
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if missing or extra or shapes:
            detail = "; ".join(part for part in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                f"other shapes for {[(k, found[k], expected[k]) for k in shapes[:2]]}" if shapes else "") if part)
            raise ConfigError(
                f"resume={self.path} does not fit the model this command builds ({detail}): a model setting differs "
                "from the run it continues (e.g. model.latent_dim, data.image_size, the net). Resume with the same "
                "model and data settings, or start a new run without resume=."
            )


def checkpoint_folder(cfg: DictConfig) -> Path:
    callback = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(str(callback.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"))


def resume_point(cfg: DictConfig) -> ResumePoint | None:
    from gencli.sweep import in_multirun

    value = cfg.get("resume")
    if value is None and (cfg.get("sweep") or {}).get("skip_done") and in_multirun():
        value = "auto"  # re-running a sweep: an unfinished job continues from its last checkpoint
    folder = checkpoint_folder(cfg)
    if value is None or value == "":
        existing = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if existing:
            raise ConfigError(
                f"the run directory {folder.parent} already holds checkpoints ({', '.join(existing[:3])}) from an earlier "
                "run. Continue it with resume=auto, or give this run its own directory (another run_name=, or drop "
                "run_name= / hydra.run.dir=), so nothing is overwritten."
            )
        return None
    if str(value) == "auto":
        path, checkpoint, skipped = find_resumable(folder)
        if path is None:
            if skipped:
                raise RuntimeFailure(
                    f"resume=auto found checkpoints in {folder} but none of them loads ({'; '.join(skipped)[:400]}). "
                    "Nothing safe to continue from: move them away to start this run again, or give "
                    "resume=PATH to a good copy."
                )
            log.info("resume=auto: no checkpoint in %s yet, starting a new run", folder)
            return None
        if skipped:
            log.warning("resume=auto: continuing from %s; skipped unreadable %s", path, "; ".join(skipped))
    else:
        path = checkpoint_path(str(value), key="resume")
        checkpoint = load_checkpoint(path, key="resume")
    point = ResumePoint(path=path, checkpoint=checkpoint)
    reached = limit_reached(cfg, checkpoint)
    if reached:
        if str(value) == "auto":
            point.complete = (f"resume=auto: {path} already reached {reached}, so this run is complete; nothing to "
                              "train. Raise that limit to train further.")
        else:
            raise ConfigError(
                f"resume={path} already reached {reached}: continuing it would train nothing. Raise that limit "
                "to train further (e.g. trainer.max_epochs=..., trainer.max_steps=..., trainer.max_time=...)."
            )
    else:
        log.info("resuming from %s (step %d, epoch %s)", path, point.step, checkpoint.get("epoch"))
    return point


def epochs_finished(checkpoint: dict[str, Any]) -> int:
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs = (fit.get("epoch_progress") or {}).get("current") or {}
    batches = fit.get("epoch_loop.batch_progress") or {}
    # A checkpoint written after an epoch's last batch (at validation end) counts that epoch as finished.
    return int(epochs.get("processed" if batches.get("is_last_batch") else "completed", 0))


def limit_reached(cfg: DictConfig, checkpoint: dict[str, Any]) -> str | None:
    """The trainer limit (as the user would write it) that the checkpoint already meets, or None."""
    trainer = cfg.get("trainer") or {}
    step = int(checkpoint.get("global_step") or 0)
    max_steps = trainer.get("max_steps")
    if max_steps is not None and int(max_steps) > 0 and step >= int(max_steps):
        return f"trainer.max_steps={max_steps} (it is at step {step})"
    max_epochs = trainer.get("max_epochs")
    done = epochs_finished(checkpoint)
    if max_epochs is not None and int(max_epochs) > 0 and done >= int(max_epochs):
        return f"trainer.max_epochs={max_epochs} (it has finished {done} epochs)"
    max_time = trainer.get("max_time")
    if max_time:
        from lightning.pytorch.callbacks import Timer

        limit = Timer(duration=max_time)._duration
        for name, state in (checkpoint.get("callbacks") or {}).items():
            if name.startswith("Timer") and limit is not None:
                elapsed = float((state.get("time_elapsed") or {}).get("train", 0.0))
                if elapsed >= limit:
                    return f"trainer.max_time={max_time} (it has trained for {elapsed:.0f} s)"
    return None
