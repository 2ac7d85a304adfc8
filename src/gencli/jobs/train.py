"""``gencli train``: compose the config, build data + model + trainer, fit, write metrics.

Returns the value of ``optimized_metric`` so Hydra sweepers (Optuna included) can minimise it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gencli.config import CONF_DIR
from gencli.io import write_json
from gencli.jobs.common import run_job
from gencli.provenance import environment

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    hardware = instantiate(cfg.hardware)
    datamodule = instantiate(cfg.data)
    model = hardware.apply(instantiate(cfg.model))
    model.run_config = OmegaConf.to_container(cfg, resolve=True)  # travels in every checkpoint

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        write_outputs(cfg, trainer, metrics)
    value = metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return None if value is None or not math.isfinite(value) else value


def write_outputs(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float]) -> None:
    out = Path(cfg.paths.output_dir)
    checkpoint = trainer.checkpoint_callback
    files = {
        "last_checkpoint": getattr(checkpoint, "last_model_path", None) or None,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "sample_grid": next((str(cb.last_written) for cb in trainer.callbacks if getattr(cb, "last_written", None)), None),
    }
    write_json(out / "metrics.json", {
        "metrics": metrics,
        "optimized_metric": cfg.get("optimized_metric"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "files": files,
        "provenance": {"seed": cfg.seed, "model": cfg.model._target_, "data": cfg.data._target_, **environment()},
    })
    log.info("metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    for name, path in files.items():
        if path:
            log.info("%s: %s", name, path)
    log.info("metrics.json: %s", out / "metrics.json")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(train, cfg)


if __name__ == "__main__":  # Lightning's DDP launcher re-runs this file once per extra rank
    main()
