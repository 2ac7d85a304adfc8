"""``gencli eval``: compute the metrics named by ``metric=`` and write metrics.json with provenance.

The job knows no metric: each entry of ``cfg.metric`` is an :class:`~gencli.metrics.base.EvalMetric`
called with one shared context (model, data split, n, seed, device, output folder).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from gencli.config import CONF_DIR
from gencli.errors import ConfigError
from gencli.io import restore_model, write_json
from gencli.jobs.common import datamodule_for, pick_device, run_job, sample_options
from gencli.metrics.base import EvalContext
from gencli.provenance import environment

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt") and not cfg.get("samples"):
        raise ConfigError("gencli eval needs ckpt=PATH (a checkpoint from 'gencli train') or samples=DIR|file.npz.")
    if not cfg.get("metric"):
        raise ConfigError("metric= is empty; choose one, e.g. metric=recon.")
    device = pick_device(cfg.device)
    model, checkpoint = restore_model(cfg.ckpt) if cfg.get("ckpt") else (None, None)
    if model is not None:
        model = model.to(device)
    datamodule = (datamodule_for(cfg, checkpoint, cfg.batch_size, model.image_shape if model is not None else None)
                  if (checkpoint or cfg.get("data")) else None)
    ctx = EvalContext(
        model=model, datamodule=datamodule, split=cfg.split, n=cfg.n, batch_size=cfg.batch_size, seed=cfg.seed,
        device=device, out_dir=Path(cfg.paths.output_dir), ckpt=cfg.get("ckpt"), samples=cfg.get("samples"),
        sample_options=sample_options(cfg, model) if model is not None else {},
    )
    report = {"metrics": {}, "provenance": {}, "files": []}
    for name, metric_cfg in cfg.metric.items():
        result = instantiate(metric_cfg)(ctx)
        report["metrics"].update(result.values)
        report["provenance"][name] = result.provenance
        report["files"] += result.files
    report["provenance"]["run"] = {
        "ckpt": cfg.get("ckpt"), "samples": cfg.get("samples"), "split": cfg.split, "n": cfg.n, "seed": cfg.seed,
        "data": datamodule.describe() if datamodule is not None else None,
        "sampling": model.sampling_info(**ctx.sample_options) if model is not None else None,
        **environment(),
    }
    path = write_json(ctx.out_dir / "metrics.json", report)
    print_table(report["metrics"], path)
    return report


def print_table(metrics: dict[str, float], path: Path) -> None:
    table = Table(title=f"gencli eval -> {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}")
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
