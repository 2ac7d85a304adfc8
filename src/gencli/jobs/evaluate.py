"""``gencli eval``: compute the metrics named by ``metric=`` and write metrics.json with provenance.

The job knows no metric: each entry of ``cfg.metric`` is an :class:`~gencli.metrics.base.EvalMetric`
called with one shared context (model or samples, data split, n, seed, device, feature extractor,
cache, output folder). Sample metrics (FID, KID, IS, PRDC) share one pass of the generated images
through the extractor (``features=``); see :mod:`gencli.metrics.sample_metrics`.
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
from gencli.labels import plan_labels
from gencli.metrics.base import EvalContext
from gencli.metrics.conditional import add_class_metrics
from gencli.provenance import environment

log = logging.getLogger(__name__)

NOT_COMPARABLE = ("numbers marked 'domain' use gencli's own domain classifier{acc}: they compare models evaluated "
                  "with the same classifier only and are NOT comparable with Inception FID/KID/IS in papers")


def evaluate(cfg: DictConfig) -> dict:
    from gencli.families.base import GenerativeModel

    if not cfg.get("ckpt") and not cfg.get("samples"):
        raise ConfigError("gencli eval needs ckpt=PATH (a checkpoint from 'gencli train') or samples=DIR|file.npz.")
    if not cfg.get("metric"):
        raise ConfigError("metric= is empty; choose one, e.g. metric=recon, metric=fid or metric=all.")
    device = pick_device(cfg.device)
    model, checkpoint = restore_model(cfg.ckpt) if cfg.get("ckpt") else (None, None)
    if model is not None and not isinstance(model, GenerativeModel):
        raise ConfigError(
            f"ckpt={cfg.ckpt} holds a {type(model).__name__}, not a generative model. A classifier from "
            "'gencli train model=classifier' is a feature extractor: pass it as features.ckpt=PATH."
        )
    if model is not None:
        model = model.to(device)
    datamodule = (datamodule_for(cfg, checkpoint, cfg.batch_size, model.image_shape if model is not None else None)
                  if (checkpoint or cfg.get("data")) else None)
    reference = cfg.get("reference") or {}
    ctx = EvalContext(
        model=model, datamodule=datamodule, split=cfg.split, n=cfg.n, batch_size=cfg.batch_size, seed=cfg.seed,
        device=device, out_dir=Path(cfg.paths.output_dir), ckpt=cfg.get("ckpt"), samples=cfg.get("samples"),
        sample_options=sample_options(cfg, model) if model is not None else {},
        features=instantiate(cfg.features) if cfg.get("features") else None,
        reference_n=reference.get("n"), use_cache=bool(reference.get("cache", True)),
        cache_dir=Path(str(cfg.paths.cache_dir)).expanduser() if cfg.paths.get("cache_dir") else None,
        save_samples=bool(cfg.get("save_samples", False)),
        labels=labels_for_eval(cfg, model),
    )
    # Resolved before any metric runs, so a bad sampler= or use_ema= fails before the expensive passes.
    sampling = model.sampling_info(**ctx.sample_options) if model is not None else None
    if cfg.get("samples"):
        sampling = None  # the sample metrics score the files; the checkpoint only names the data (and recon)
    ctx.metrics = add_class_metrics(
        {name: instantiate(metric_cfg) for name, metric_cfg in cfg.metric.items() if metric_cfg is not None}, ctx)
    report = {"metrics": {}, "provenance": {}, "files": []}
    for name, metric in ctx.metrics.items():
        result = metric(ctx)
        report["metrics"].update(result.values)
        report["provenance"][name] = result.provenance
        report["files"] += result.files
    report["provenance"]["run"] = {
        "ckpt": cfg.get("ckpt"), "samples": cfg.get("samples"), "split": cfg.split, "n": cfg.n, "seed": cfg.seed,
        "data": datamodule.describe() if datamodule is not None else None,
        "sampling": sampling,
        "weights": checkpoint_weights(sampling) if sampling is not None else None,
        **environment(),
    }
    if sampling is not None and "sampling_cost" in ctx.shared:  # what the samples cost: for NFE-vs-quality tables
        report["sampling_cost"] = {"nfe": sampling.get("nfe"), **ctx.shared["sampling_cost"]}
    path = write_json(ctx.out_dir / "metrics.json", report)
    print_table(report, path)
    return report


def labels_for_eval(cfg: DictConfig, model):
    """The classes the generated images are drawn as: ``labels=`` (class-balanced by default) for a conditional
    checkpoint; samples= files carry their own labels (an .npz's ``labels`` array)."""
    if cfg.get("samples"):
        if cfg.get("labels") is not None:
            raise ConfigError(f"labels={cfg.labels} chooses the classes of images generated from ckpt=; the images of "
                              f"samples={cfg.samples} already have theirs (the 'labels' array gencli sample writes into "
                              "samples.npz). Drop labels=.")
        return None
    return plan_labels(cfg.get("labels"), model) if model is not None else None


def checkpoint_weights(info: dict) -> str:
    """'ema' or 'raw': which weights made the samples (families without EMA sample with their raw weights)."""
    for key in ("weights", "generator", "ema"):
        value = info.get(key)
        if isinstance(value, str) and value in ("ema", "raw"):
            return value
        if isinstance(value, bool):
            return "ema" if value else "raw"
    return "raw"


def print_table(report: dict, path: Path) -> None:
    """The metrics as a Rich table, each with the features it was measured on and any warning."""
    metrics, provenance = report["metrics"], report["provenance"]
    table = Table(title=f"gencli eval -> {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("measured on")
    features_of = {}
    for name, prov in provenance.items():
        if isinstance(prov, dict) and isinstance(prov.get("measured_on"), str):  # a metric that says it itself
            features_of.update({key: prov["measured_on"] for key in metrics if key.startswith(name)})
        elif isinstance(prov, dict) and isinstance(prov.get("features"), dict):
            f, ref, gen = prov["features"], prov.get("reference", {}), prov.get("generated", {})
            label = f"{f['name']}: {gen.get('n_generated')} generated vs {ref.get('n_real')} real ({ref.get('split')})"
            for key in metrics:
                if key.startswith(name) or (name == "prdc" and key.split("_")[0] in ("precision", "recall", "density", "coverage")):
                    features_of[key] = label
    for key, value in metrics.items():
        table.add_row(key, f"{value:.6g}", features_of.get(key, "reconstructions of real images"))
    notes = [prov["skipped"] for prov in provenance.values() if isinstance(prov, dict) and prov.get("skipped")]
    domain = next((p["features"] for p in provenance.values() if isinstance(p, dict)
                   and isinstance(p.get("features"), dict) and not p["features"].get("comparable_with_papers")), None)
    if domain is not None:
        acc = domain.get("held_out_accuracy")
        notes.append(NOT_COMPARABLE.format(acc=f" (held-out accuracy {acc:.2%})" if acc is not None else ""))
    cost = report.get("sampling_cost")
    if cost:
        nfe = f"{cost['nfe']} network evaluations and " if cost.get("nfe") else ""
        notes.append(f"sampling cost: {nfe}{cost['seconds_per_image']:.4g} s per image ({cost['images']} images)")
    if notes:
        table.caption = "\n".join(notes)
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
