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

``gencli train`` runs these checks twice: in the pre-flight (:func:`preflight`, called by
:func:`gencli.config.precheck` before Hydra creates the run folder or writes ``.hydra/``), so that a refused
command leaves the folder byte-for-byte as it was, and again in the job (:func:`resume_point`, the backstop
for jobs of a multirun and library callers). A checkpoint the pre-flight loaded is handed to the job of the
same process, not loaded twice.

Lightning itself then restores the model, optimisers, LR schedules, loop counters and callback states
(through :class:`gencli.checkpoints.SafeCheckpointIO`, which hands it the checkpoint loaded here);
:class:`gencli.callbacks.TrainingRandomState` restores the random state and
:class:`gencli.data.base.EpochSampler` the position in the epoch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
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
    #: Unreadable checkpoints resume=auto passed over (warned about when the job starts).
    skipped: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("global_step") or 0)

    def check_family(self, family_built: str) -> None:
        """The checkpoint must hold the family (class name) the command builds."""
        family = self.checkpoint["gencli"].get("family")
        if family and family != family_built:
            raise ConfigError(
                f"resume={self.path} holds a {family}, but this command builds a {family_built}. Resume with the "
                f"model settings the run was started with (its config is in the checkpoint and in the run's .hydra/ "
                f"folder), or start a new run without resume=."
            )

    def check_matches(self, model) -> None:
        """The checkpoint must hold the model the command builds: the same class and tensor shapes."""
        self.check_family(type(model).__name__)
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


#: What the pre-flight found, by (checkpoint folder, resume=), for the job of the same process to take up.
_PREFLIGHT: dict[tuple[str, str], ResumePoint] = {}


def _key(cfg: DictConfig) -> tuple[str, str]:
    """resume=auto: the folder it looks in; resume=PATH: the file (a run folder named after the start time is named
    again when Hydra composes, so the pre-flight's and the job's folders differ)."""
    value = str(cfg.get("resume"))
    return (os.path.realpath(checkpoint_folder(cfg)) if value == "auto" else ""), value


def preflight(cfg: DictConfig) -> ResumePoint | None:
    """The checks of :func:`resume_point`, run by the CLI before Hydra writes anything into the run folder (a
    refusal there leaves the folder as it was), plus the family check (the model's class against the
    checkpoint's, without building the model). A checkpoint loaded here is kept for the job of this process."""
    point = find_point(cfg)
    if point is not None:
        target = str((cfg.get("model") or {}).get("_target_") or "")
        if target:
            point.check_family(target.rsplit(".", 1)[-1])
        model = model_outline(cfg, point)
        if model is not None:
            point.check_matches(model)
        _PREFLIGHT[_key(cfg)] = point
    return point


def model_outline(cfg: DictConfig, point: ResumePoint):
    """The model the command builds, on PyTorch's meta device (shapes, no memory, no initialisation) or, for a
    family that computes numbers while it is built, on the CPU, to compare with the checkpoint before anything is
    written; None where it cannot be built here (the job then builds it for real and checks it). A class-conditional
    model takes its classes from the data in the job: here from the checkpoint's config, where the command leaves
    them open."""
    import warnings

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(cfg.model, resolve=True)
        stored = (point.checkpoint["gencli"].get("config") or {}).get("model") or {}
        if node.get("conditional"):
            for key in ("num_classes", "class_names"):
                value = stored.get(key)  # plain data only: this node is instantiated below
                plain = isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
                if node.get(key) is None and plain:
                    node[key] = value
    except Exception as err:  # noqa: BLE001 - left to the job, which builds the model anyway
        log.debug("resume pre-flight: the model config could not be read here (%s)", err)
        return None
    for device in ("meta", "cpu"):  # a family that computes numbers while it is built (a noise schedule): on the CPU
        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), torch.device(device):
                warnings.simplefilter("ignore")
                return instantiate(node)
        except Exception as err:  # noqa: BLE001 - left to the job, which builds the model anyway
            log.debug("resume pre-flight: the model could not be built on %s (%s)", device, err)
    return None


def resume_point(cfg: DictConfig) -> ResumePoint | None:
    """The checkpoint this run continues from (None: a fresh start); refusals as one paragraph (module notes)."""
    point = _PREFLIGHT.pop(_key(cfg), None)  # loaded by this process's pre-flight, the lock held since
    if point is None:
        point = find_point(cfg)
    if point is not None:
        if point.skipped:
            log.warning("resume=auto: continuing from %s; skipped unreadable %s", point.path, "; ".join(point.skipped))
        if not point.complete:
            log.info("resuming from %s (step %d, epoch %s)", point.path, point.step, point.checkpoint.get("epoch"))
    return point


def find_point(cfg: DictConfig) -> ResumePoint | None:
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
    else:
        path = checkpoint_path(str(value), key="resume")
        checkpoint, skipped = load_checkpoint(path, key="resume"), []
    point = ResumePoint(path=path, checkpoint=checkpoint, skipped=list(skipped))
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
