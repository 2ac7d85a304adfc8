"""``gencli train``: compose the config, build data + model + trainer, fit (or continue), write metrics.

Returns the value of ``optimized_metric`` so Hydra sweepers (Optuna included) can minimise it.
``resume=PATH|auto`` continues an interrupted run (see :mod:`gencli.jobs.resume`); ``metrics.json``
always says how the run ended: ``completed``, ``interrupted`` (a signal; the checkpoint to continue
from is named) or ``failed`` (with the reason).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gencli.callbacks.random_state import TrainingRandomState
from gencli.callbacks.throughput import Throughput
from gencli.checkpoint_io import SafeCheckpointIO
from gencli.config import CONF_DIR
from gencli.errors import GencliError, Interrupted
from gencli.hardware import compile_record
from gencli.io import write_json
from gencli.jobs.common import launcher_mark, run_job
from gencli.jobs.resume import ResumePoint, resume_point
from gencli.loggers import close, log_config, log_final_metrics
from gencli.provenance import environment
from gencli.runlock import hold, training_starts
from gencli.scaling import apply_batch_plan
from gencli.sweep import ranks_run_this_job

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    # The run folder belongs to this run while it lives (gencli.runlock): gencli train's pre-flight took the lock
    # before Hydra wrote into the folder; a job of a multirun (or a library caller) takes it here. DDP ranks
    # started by Lightning's launcher share their launcher's.
    with hold(cfg.paths.output_dir, "gencli train run"):
        return fit(cfg)


def fit(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    resume = resume_point(cfg)
    if resume is not None and resume.complete:
        log.info(resume.complete)
        return finished_value(cfg, resume)
    hardware = instantiate(cfg.hardware)
    mismatch = hardware.mismatch(cfg.trainer.get("accelerator", "auto"), hardware_profile(cfg))
    if mismatch:
        log.warning(mismatch)
    datamodule = instantiate(cfg.data)
    classes_from_data(cfg, datamodule)
    model = hardware.apply(instantiate(cfg.model))
    # travels in every checkpoint (without Hydra's own settings, which only the launching command needs)
    model.run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    if resume is not None:
        resume.check_matches(model)

    # TrainingRandomState keeps the training steps' random stream apart from everything else and in checkpoints.
    callbacks = [TrainingRandomState(), *(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    checkpoint_io = SafeCheckpointIO(preloaded={str(resume.path): resume.checkpoint} if resume else None)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[checkpoint_io])
    # the per-device batch and the learning rates for this many devices (data.global_batch_size, lr_scaling)
    apply_batch_plan(cfg, trainer, datamodule, model)
    log_config(loggers, model.run_config)  # W&B / MLflow: the whole resolved config, not only the model's hparams
    try:
        # ranks Lightning starts from here know their launcher (jobs.common.run_job) and run this job, not a sweep
        with launcher_mark(), ranks_run_this_job(cfg.paths.output_dir):
            training_starts(cfg.paths.output_dir)  # a refusal from here on no longer puts the old folder back
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
    except GencliError as err:
        if trainer.is_global_zero:
            status = "interrupted" if isinstance(err, Interrupted) else "failed"
            write_outputs(cfg, trainer, scalar_metrics(trainer), resume, status=status, reason=err.message)
        raise

    metrics = scalar_metrics(trainer)
    pruned = any(getattr(callback, "pruned", False) for callback in trainer.callbacks)
    if trainer.is_global_zero:
        write_outputs(cfg, trainer, metrics, resume, status="pruned" if pruned else "completed",
                      reason="stopped early by the Optuna search's pruner" if pruned else None)
    value = metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return None if value is None or not math.isfinite(value) else value


def hardware_profile(cfg: DictConfig) -> str | None:
    """The name of the hardware= profile this run composed (gpu_fast, cpu_fast...), when Hydra knows it."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get("hardware")
    except ValueError:  # composed outside a Hydra run (tests, library use)
        return None


def classes_from_data(cfg: DictConfig, datamodule) -> None:
    """A conditional model learns its classes from the data, as it learns its image shape: ``model.num_classes`` and
    ``model.class_names`` are filled in from ``datamodule.classes()`` (so the stored config rebuilds the model)."""
    if not cfg.model.get("conditional"):
        return
    from omegaconf import open_dict

    from gencli.errors import ConfigError

    names = datamodule.classes()
    if not names or len(names) < 2:
        where = f" (data.root={getattr(datamodule, 'root', None)})" if hasattr(datamodule, "root") else ""
        raise ConfigError(
            f"model.conditional=true needs labelled data, and data={datamodule.name}{where} has "
            f"{'one class' if names else 'no labels'}: a folder is labelled by its subfolders (one per class, at least "
            "two, with every image inside one). Sort the images into class subfolders, or set model.conditional=false."
        )
    given = cfg.model.get("num_classes")
    if given is not None and int(given) != len(names):
        raise ConfigError(f"model.num_classes={given} but data={datamodule.name} has {len(names)} classes "
                          f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); leave model.num_classes "
                          "null: gencli takes it from the data.")
    with open_dict(cfg):
        cfg.model.num_classes = len(names)
        cfg.model.class_names = list(names)


def scalar_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def finished_value(cfg: DictConfig, resume: ResumePoint) -> float | None:
    """A run that ``resume=auto`` finds already complete: make sure its metrics.json says so, return its value."""
    out = Path(cfg.paths.output_dir)
    report = out / "metrics.json"
    metrics = dict(resume.checkpoint["gencli"].get("metrics") or {})
    if not report.is_file():
        write_json(report, {
            "status": "completed", "metrics": metrics, "optimized_metric": cfg.get("optimized_metric"),
            "epochs": resume.checkpoint.get("epoch"), "steps": resume.checkpoint.get("global_step"),
            "files": {"last_checkpoint": str(resume.path)},
            "provenance": {"seed": cfg.seed, "model": cfg.model._target_, "data": cfg.data._target_, **environment()},
        })
    value = metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return None if value is None or not math.isfinite(value) else value


def write_outputs(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float], resume: ResumePoint | None,
                  status: str = "completed", reason: str | None = None) -> None:
    out = Path(cfg.paths.output_dir)
    checkpoint = trainer.checkpoint_callback
    files = {
        "last_checkpoint": getattr(checkpoint, "last_model_path", None) or None,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "sample_grid": next((str(cb.last_written) for cb in trainer.callbacks if getattr(cb, "last_written", None)), None),
    }
    write_json(out / "metrics.json", {
        "status": status,
        **({"reason": reason} if reason else {}),
        "metrics": metrics,
        "optimized_metric": cfg.get("optimized_metric"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "resumed_from": {"checkpoint": str(resume.path), "step": resume.step} if resume else None,
        "files": files,
        "provenance": {"seed": cfg.seed, "model": cfg.model._target_, "data": cfg.data._target_, **environment()},
        # hardware.compile: false, "compiled", or "fell back (net: reason)" for a net torch.compile failed on
        # (gencli.hardware.CompileGuard: that net trained eagerly)
        **compile_record(trainer.lightning_module),
        # training images/s and optimiser steps/s after warm-up, as the run measured them (callbacks.throughput)
        **({"throughput": t} if (t := next((cb.report for cb in trainer.callbacks if isinstance(cb, Throughput)),
                                           None)) else {}),
        # what a reader must know beside the metrics (e.g. that the VAE's bits/dim are not the papers' kind)
        **({"notes": notes} if (notes := getattr(trainer.lightning_module, "score_notes", list)()) else {}),
    })
    # what metrics.json says reaches the loggers too (W&B summary, MLflow final/* metrics), then W&B's run ends
    log_final_metrics(trainer.loggers, metrics, status, trainer.global_step)
    close(trainer.loggers)
    if status == "completed":
        log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    for name, path in files.items():
        if path:
            log.info("%s: %s", name, path)
    log.info("metrics.json: %s (%s)", out / "metrics.json", status)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(train, cfg)


if __name__ == "__main__":  # Lightning's DDP launcher re-runs this file once per extra rank
    main()
