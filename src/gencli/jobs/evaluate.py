"""``gencli eval``: compute the metrics named by ``metric=`` and write metrics.json with provenance.

The images judged are generated from ``ckpt=`` or read from ``samples=``; the real ones are a data split (the
checkpoint's data, or ``data=``) or ``ref=`` files (any two image sets, like torch-fidelity's --input1/--input2).
The job knows no metric and no family: each entry of ``cfg.metric`` is an :class:`~gencli.metrics.base.EvalMetric`
called with one shared context (model or samples, data split, n, seed, device, feature extractor,
cache, output folder). Sample metrics (FID, KID, IS, PRDC) share one pass of the generated images
through the extractor (``features=``); see :mod:`gencli.metrics.sample_metrics`.

``hardware=`` runs the model's sampling net as the profile says (:mod:`gencli.sampling_hardware`; the feature
extractor is untouched, so FID is measured in the same float32 feature space whatever the profile), and
metrics.json's ``timing`` says where the wall time went: generation (with its images/s), feature extraction, I/O,
the extractor's setup and the metric computations (:mod:`gencli.metrics.timing`), printed as one line under the
table.

SIGTERM / Ctrl+C stop it at once (exit 143 / 130, :func:`gencli.jobs.common.run_job`): metrics.json, written last,
is then not written (no metric is reported from part of its images) and job.json says ``interrupted``.
"""

from __future__ import annotations

import contextlib
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
from gencli.jobs.common import datamodule_for, pick_device, run_job, sample_options, sampling_settings
from gencli.labels import plan_labels
from gencli.metrics.base import EvalContext
from gencli.metrics.conditional import add_class_metrics
from gencli.metrics.timing import TimeSplit, summary_line, timed, timing
from gencli.provenance import environment
from gencli.sampling_hardware import sampling_hardware

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt") and not cfg.get("samples"):
        raise ConfigError("gencli eval needs ckpt=PATH (a checkpoint from 'gencli train') or samples=DIR|file.npz "
                          "(then the real images are data=<name> or ref=DIR|file.npz).")
    if not cfg.get("ckpt") and not cfg.get("data") and not cfg.get("ref"):
        raise ConfigError(f"samples={cfg.samples} needs real images to be compared with: ref=DIR|file.npz (any folder "
                          "or .npz of images) or data=<name> (a data set's split=val|train).")
    if not cfg.get("metric"):
        raise ConfigError("metric= is empty; choose one, e.g. metric=recon, metric=fid or metric=all.")
    device = pick_device(cfg.device)
    split = TimeSplit(device)
    with timing(split):
        return measure(cfg, device, split)


def measure(cfg: DictConfig, device, split: TimeSplit) -> dict:
    """The eval job's work, timed part by part into ``split``."""
    from gencli.families.base import GenerativeModel

    with timed("setup"):  # loading the checkpoint and building the model
        model, checkpoint = restore_model(cfg.ckpt) if cfg.get("ckpt") else (None, None)
    if model is not None and not isinstance(model, GenerativeModel):
        raise ConfigError(
            f"ckpt={cfg.ckpt} holds a {type(model).__name__}, not a generative model. A classifier from "
            "'gencli train model=classifier' is a feature extractor: pass it as features.ckpt=PATH."
        )
    if model is not None:
        with timed("setup"):  # device start-up
            model = model.to(device)
    with timed("io"):
        datamodule = (datamodule_for(cfg, checkpoint, cfg.batch_size, model.image_shape if model is not None else None)
                      if (checkpoint or cfg.get("data")) else None)
    reference = cfg.get("reference") or {}
    ctx = EvalContext(
        model=model, datamodule=datamodule, split=cfg.split, n=cfg.n, batch_size=cfg.batch_size, seed=cfg.seed,
        device=device, out_dir=Path(cfg.paths.output_dir), ckpt=cfg.get("ckpt"), samples=cfg.get("samples"),
        ref=cfg.get("ref"),
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
    rows, notes = {}, []
    hardware = contextlib.nullcontext(None)
    if model is not None and not cfg.get("samples"):  # the model generates: it samples as hardware= says
        settings, profile = sampling_settings(cfg, device)
        hardware = sampling_hardware(settings, model, device, ctx.sample_options.get("use_ema"), profile)
    if ctx.save_samples:  # this run replaces samples.npz: an earlier metrics.json must not describe a mix of runs
        (ctx.out_dir / "metrics.json").unlink(missing_ok=True)
    with hardware as ctx.sampling_hardware:
        for name, metric in ctx.metrics.items():
            result = metric(ctx)
            report["metrics"].update(result.values)
            report["provenance"][name] = result.provenance
            report["files"] += result.files
            rows.update(result.rows)
            notes += [note for note in result.notes if note not in notes]
    if sampling is not None and ctx.sampling_hardware is not None:
        sampling = {**sampling, "hardware": ctx.sampling_hardware}
    report["provenance"]["run"] = {
        "ckpt": cfg.get("ckpt"), "samples": cfg.get("samples"), "ref": cfg.get("ref"), "split": cfg.split,
        "n": cfg.n, "seed": cfg.seed, "data": datamodule.describe() if datamodule is not None else None,
        "sampling": sampling,
        # which weights made the samples: every family's sampling_info says ("ema" or "raw")
        "weights": sampling.get("weights", "raw") if sampling is not None else None,
        **environment(),
    }
    if sampling is not None and "sampling_cost" in ctx.shared:  # measured by the sample pass, for NFE-vs-quality
        report["sampling_cost"] = ctx.shared["sampling_cost"]
    # where the wall time went up to here (writing metrics.json itself is not in it)
    report["timing"] = split.report()
    path = write_json(ctx.out_dir / "metrics.json", report)
    print_table(report["metrics"], rows, notes, path, summary_line(report["timing"]))
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


def print_table(metrics: dict[str, float], rows: dict[str, str], notes: list[str], path: Path,
                timing_line: str | None = None) -> None:
    """The metrics as a Rich table, each with what it was measured on (as its metric describes it), notes below,
    then where the time went (one line)."""
    table = Table(title=f"gencli eval -> {path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("measured on")
    for key, value in metrics.items():
        table.add_row(key, "null (not finite)" if value is None else f"{value:.6g}", rows.get(key, ""))
    if notes:
        table.caption = "\n".join(notes)
    console = Console()
    console.print(table)
    if timing_line:
        console.print(timing_line, highlight=False, soft_wrap=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
