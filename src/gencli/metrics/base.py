"""The plug-in point of ``gencli eval``.

``conf/metric/<name>.yaml`` holds a mapping of metric name -> config with a ``_target_`` subclass of
:class:`EvalMetric`; the eval job instantiates each, calls it with one shared :class:`EvalContext`
and merges the returned values and provenance into ``metrics.json``. A new metric (FID, KID, ...)
is a new class and a new YAML file, with no change to the job. Metrics that can share work (the sample
metrics share one pass of generated images through the feature extractor) find each other through
``EvalContext.metrics`` and keep what they share in ``EvalContext.shared``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gencli.errors import ConfigError


@dataclass
class EvalContext:
    """Everything a metric may use. ``model`` is None when evaluating ``samples=`` files alone."""

    model: Any | None
    datamodule: Any | None
    split: str
    n: int
    batch_size: int
    seed: int
    device: torch.device
    out_dir: Path
    sample_options: dict = field(default_factory=dict)
    ckpt: str | None = None
    samples: str | None = None
    #: ``ref=``: a folder / .npz of real images to compare against instead of a data split (like torch-fidelity's
    #: --input2); None: the data split ``split`` of ``datamodule``.
    ref: str | None = None
    #: The feature extractor of the sample metrics (``features=``), prepared on first use.
    features: Any | None = None
    #: Real images in the reference statistics (None or <= 0: the whole split).
    reference_n: int | None = None
    #: Where reference statistics (and the domain classifier) are cached; ``use_cache=False`` recomputes.
    cache_dir: Path | None = None
    use_cache: bool = True
    #: Write the generated images (samples.npz + samples.png) besides metrics.json.
    save_samples: bool = False
    #: A conditional model's :class:`~gencli.labels.LabelPlan` (``labels=``; class-balanced by default), else None.
    labels: Any | None = None
    #: Every metric of this run by name (so metrics can share one pass over the images).
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Results metrics share within one run (e.g. the sample pass).
    shared: dict[str, Any] = field(default_factory=dict)
    #: What ``hardware=`` applied to the model's sampling nets (:func:`gencli.sampling_hardware.sampling_hardware`),
    #: recorded with the generated images' provenance; None when nothing is generated.
    sampling_hardware: dict | None = None

    def has_encoder(self) -> bool:
        return self.model is not None and bool(getattr(self.model, "has_encoder", False))

    def require_encoder(self, metric: str) -> Any:
        if self.model is None:
            raise ConfigError(f"metric {metric} needs ckpt=PATH of a model with an encoder (ae, vae).")
        if not self.model.has_encoder:
            raise ConfigError(
                f"metric {metric} needs a family with an encoder (ae, vae); ckpt={self.ckpt} holds a "
                f"{type(self.model).__name__}. Use a sample-based metric instead (e.g. metric=fid)."
            )
        return self.model

    def require_data(self, metric: str) -> Any:
        if self.datamodule is None:
            raise ConfigError(f"metric {metric} needs real images: give data=<name> (and data.root=...) or a ckpt.")
        return self.datamodule


@dataclass
class MetricResult:
    """What one metric measured. A metric describes its own table rows, so the eval job prints any metric alike:
    ``rows`` says, per value, what it was measured on (by default the provenance's ``measured_on``), ``notes`` what
    a reader must know beside the table (a skipped metric, a feature space not comparable with papers)."""

    values: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    rows: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        measured_on = self.provenance.get("measured_on")
        if isinstance(measured_on, str):
            self.rows = {key: measured_on for key in self.values} | self.rows
        skipped = self.provenance.get("skipped")
        if isinstance(skipped, str) and skipped not in self.notes:
            self.notes.append(skipped)


class EvalMetric:
    """Base class: subclasses implement :meth:`__call__`."""

    name = "metric"

    def __call__(self, ctx: EvalContext) -> MetricResult:
        raise NotImplementedError
