"""FID, KID, IS and precision/recall/density/coverage of generated images: one streamed pass.

Each metric is an :class:`~gencli.metrics.base.EvalMetric` (``conf/metric/fid.yaml`` ...), but all the
sample metrics of one ``gencli eval`` run share a single pass (:func:`run_sample_metrics`): images
flow batch by batch from the source (the model's sampler, or ``samples=`` files) through the feature
extractor, and each batch's features and logits go to every metric's update. Only features are kept
(n x D floats for KID, at most ``max_samples`` x D for PRDC), never the images (unless
``save_samples=true``).

The maths of FID, KID and IS is torchmetrics': gencli hands each torchmetrics metric a
:class:`PrecomputedFeatures` module (the identity, with ``num_features``) as its ``feature`` network
and updates it with the features it extracted once, so all three use the same extractor (and, for
Inception, the same weights file). The real side comes from the reference cache: FID's
``real_features_sum``/``real_features_cov_sum``/``real_features_num_samples`` states are set from the
cached sums, KID's ``real_features`` from the cached bank; no real image passes through torchmetrics.
PRDC is gencli's own (:mod:`gencli.metrics.prdc`), on the same features.

KID's subsets and IS's split order are drawn from torch's global generator: gencli seeds it from
``seed`` (inside ``fork_rng``) so the same command gives the same numbers.

Metric names carry the extractor: ``fid``, ``kid``, ``is`` ... for Inception (comparable with papers),
``fid_domain``, ``kid_domain``, ``is_domain`` ... for the domain classifier (not comparable).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.metrics.base import EvalContext, EvalMetric, MetricResult
from gencli.metrics.prdc import prdc
from gencli.metrics.reference import ReferenceStats, load_or_compute
from gencli.metrics.sources import FileSource, ImageSource, ModelSource
from gencli.progress import track_batches

log = logging.getLogger(__name__)

#: torchmetrics must not try to all-gather states: only one process computes these.
METRIC_KWARGS = {"sync_on_compute": False}


class PrecomputedFeatures(nn.Module):
    """The ``feature`` network handed to torchmetrics: gencli passes features, so it is the identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def at_least(key: str, value: Any, minimum: float, kind: type = int) -> Any:
    """``kind(value)`` if it is >= minimum, else a ConfigError naming ``metric.<key>`` (checked when the metric is
    built, so a bad setting fails before the classifier training and the sample pass)."""
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        converted = None
    if converted is None or converted != converted or converted < minimum:
        raise ConfigError(f"metric.{key}={value!r} must be a number >= {minimum:g}; see conf/metric/ for the defaults.")
    return converted


def metric_suffix(extractor) -> str:
    return "" if extractor.name == "inception" else f"_{extractor.name}"


class SampleMetric(EvalMetric):
    """A metric of generated images against reference statistics, fed one batch of features at a time."""

    needs_logits = False

    def begin(self, ref: ReferenceStats, n_fake: int) -> None:
        raise NotImplementedError

    def update(self, features: Tensor, logits: Tensor | None) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, float]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}

    def __call__(self, ctx: EvalContext) -> MetricResult:
        results = shared_pass(ctx, self)
        return results[id(self)]


class FIDMetric(SampleMetric):
    """Fréchet distance (Heusel et al. 2017) by torchmetrics' FrechetInceptionDistance, in float64."""

    name = "fid"

    def begin(self, ref: ReferenceStats, n_fake: int) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=PrecomputedFeatures(ref.features.shape[1]), **METRIC_KWARGS)
        self.metric.real_features_sum = torch.from_numpy(np.asarray(ref.feature_sum, dtype=np.float64)).clone()
        self.metric.real_features_cov_sum = torch.from_numpy(np.asarray(ref.outer_sum, dtype=np.float64)).clone()
        self.metric.real_features_num_samples = torch.tensor(int(ref.n), dtype=torch.long)
        self.notes = []
        dim = ref.features.shape[1]
        if min(ref.n, n_fake) <= dim:
            self.notes.append(f"fewer images (real {ref.n}, generated {n_fake}) than feature dimensions ({dim}): the "
                              "covariances are rank-deficient and FID is biased upwards; use n > D")

    def update(self, features: Tensor, logits: Tensor | None) -> None:
        self.metric.update(features.double(), real=False)

    def finish(self) -> dict[str, float]:
        return {"fid": float(self.metric.compute())}

    def settings(self) -> dict[str, Any]:
        return {"implementation": "torchmetrics FrechetInceptionDistance on precomputed features (float64)",
                **({"notes": self.notes} if self.notes else {})}


class KIDMetric(SampleMetric):
    """Kernel distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over subsets."""

    name = "kid"

    def __init__(self, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef: float = 1.0,
                 gamma: float | None = None):
        self.subsets, self.subset_size = at_least("kid.subsets", subsets, 1), at_least("kid.subset_size", subset_size, 2)
        self.degree = at_least("kid.degree", degree, 1)
        self.coef = at_least("kid.coef", coef, 1e-12, float)  # torchmetrics wants a float > 0 (an int 1 fails)
        self.gamma = None if gamma is None else at_least("kid.gamma", gamma, 1e-12, float)

    def begin(self, ref: ReferenceStats, n_fake: int) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance

        self.used_subset_size = min(self.subset_size, ref.n, n_fake)
        if self.used_subset_size < 2:
            raise ConfigError("KID needs at least 2 real and 2 generated images.")
        with warnings.catch_warnings():  # "will save all extracted features in buffer": features only, n x D
            warnings.simplefilter("ignore", UserWarning)
            self.metric = KernelInceptionDistance(
                feature=PrecomputedFeatures(ref.features.shape[1]), subsets=self.subsets,
                subset_size=self.used_subset_size, degree=self.degree, gamma=self.gamma, coef=self.coef, **METRIC_KWARGS,
            )
        self.metric.real_features.append(ref.features.double())

    def update(self, features: Tensor, logits: Tensor | None) -> None:
        self.metric.update(features.double(), real=False)

    def finish(self) -> dict[str, float]:
        mean, std = self.metric.compute()
        return {"kid": float(mean), "kid_std": float(std)}

    def settings(self) -> dict[str, Any]:
        return {"implementation": "torchmetrics KernelInceptionDistance on precomputed features (float64)",
                "subsets": self.subsets, "subset_size": self.used_subset_size, "subset_size_asked": self.subset_size,
                "kernel": f"(x.y * {self.gamma if self.gamma is not None else '1/d'} + {self.coef:g})^{self.degree}"}


class ISMetric(SampleMetric):
    """Inception Score (Salimans et al. 2016) by torchmetrics' InceptionScore, on the extractor's logits."""

    name = "is"
    needs_logits = True

    def __init__(self, splits: int = 10):
        self.splits = at_least("is.splits", splits, 1)

    def begin(self, ref: ReferenceStats, n_fake: int) -> None:
        from torchmetrics.image.inception import InceptionScore

        self.used_splits = max(1, min(self.splits, n_fake))
        with warnings.catch_warnings():  # "will save all extracted features in buffer": logits only, n x K
            warnings.simplefilter("ignore", UserWarning)
            self.metric = InceptionScore(feature=PrecomputedFeatures(1), splits=self.used_splits, **METRIC_KWARGS)

    def update(self, features: Tensor, logits: Tensor | None) -> None:
        if logits is None:
            raise ConfigError("metric=is needs a feature extractor with class logits (inception or domain).")
        self.metric.update(logits.double())

    def finish(self) -> dict[str, float]:
        with warnings.catch_warnings():  # one split has no std: it is left out rather than written as NaN
            warnings.simplefilter("ignore", UserWarning)
            mean, std = self.metric.compute()
        return {"is": float(mean), **({"is_std": float(std)} if self.used_splits > 1 else {})}

    def settings(self) -> dict[str, Any]:
        return {"implementation": "torchmetrics InceptionScore on the extractor's logits", "splits": self.used_splits}


class PRDCMetric(SampleMetric):
    """Precision/recall (k-NN manifolds) and density/coverage on the same features (gencli.metrics.prdc)."""

    name = "prdc"

    def __init__(self, nearest_k: int = 5, max_samples: int = 10000, chunk: int = 1024):
        self.nearest_k = at_least("prdc.nearest_k", nearest_k, 1)
        self.max_samples, self.chunk = at_least("prdc.max_samples", max_samples, 2), at_least("prdc.chunk", chunk, 1)

    def begin(self, ref: ReferenceStats, n_fake: int) -> None:
        self.real = ref.features[: self.max_samples]
        self.fake: list[Tensor] = []
        self.kept = 0
        if min(len(self.real), min(n_fake, self.max_samples)) <= self.nearest_k:
            raise ConfigError(f"PRDC with nearest_k={self.nearest_k} needs more than {self.nearest_k} real and generated "
                              "images; raise n.")

    def update(self, features: Tensor, logits: Tensor | None) -> None:
        take = features[: max(0, self.max_samples - self.kept)]
        if len(take):
            self.fake.append(take)
            self.kept += len(take)

    def finish(self) -> dict[str, float]:
        return prdc(self.real, torch.cat(self.fake), k=self.nearest_k, chunk=self.chunk)

    def settings(self) -> dict[str, Any]:
        return {"implementation": "gencli.metrics.prdc (closed k-NN balls, float64)", "nearest_k": self.nearest_k,
                "n_real_used": len(self.real), "n_generated_used": self.kept, "max_samples": self.max_samples}


# ----------------------------------------------------------------------------- the pass
def run_sample_metrics(metrics: list[SampleMetric], source: ImageSource, extractor, ref: ReferenceStats,
                       batch_size: int, seed: int, keep_images: bool = False,
                       description: str = "generated images") -> dict[str, Any]:
    """Stream ``source`` through ``extractor`` into every metric; return values, timing and (optionally) images."""
    for metric in metrics:
        metric.begin(ref, source.n)
    kept: list[np.ndarray] = []
    start = time.perf_counter()
    for _, (images, u8) in zip(track_batches(source.n, batch_size, description), source.stream(batch_size)):
        features, logits = extractor.extract(images)
        for metric in metrics:
            metric.update(features, logits)
        if keep_images:
            kept.append(u8)
    seconds = time.perf_counter() - start
    values: dict[int, dict[str, float]] = {}
    suffix = metric_suffix(extractor)
    for metric in metrics:
        with torch.random.fork_rng(devices=[]):  # KID subsets, IS split order: seeded, caller's RNG untouched
            torch.manual_seed(seed)
            values[id(metric)] = {f"{k}{suffix}" if not k.endswith("_std") else f"{k[:-4]}{suffix}_std": v
                                  for k, v in metric.finish().items()}
    return {"values": values, "seconds": seconds, "images_per_second": source.n / max(seconds, 1e-9),
            "images": np.concatenate(kept) if kept else None}


def make_source(ctx: EvalContext, datamodule) -> ImageSource:
    if ctx.samples:
        return FileSource(ctx.samples, datamodule.image_shape, n=ctx.n, data_name=datamodule.name)
    if ctx.model is None:
        raise ConfigError("sample metrics need ckpt=PATH (to generate images) or samples=DIR|file.npz.")
    return ModelSource(ctx.model, ctx.n, ctx.seed, ctx.sample_options, ckpt=ctx.ckpt)


def shared_pass(ctx: EvalContext, requester: SampleMetric) -> dict[int, MetricResult]:
    """Run the one pass for every sample metric of this eval run (once), return each one's result."""
    if "sample_pass" in ctx.shared:
        return ctx.shared["sample_pass"]
    metrics = [m for m in (ctx.metrics or {}).values() if isinstance(m, SampleMetric)]
    if requester not in metrics:
        metrics.append(requester)
    names = ", ".join(m.name for m in metrics)
    datamodule = ctx.require_data(names)
    if ctx.features is None:
        raise ConfigError(f"metric {names} needs a feature extractor: features=domain or features=inception.")
    source = make_source(ctx, datamodule)  # shape errors before any classifier training or data pass
    extractor = ctx.features
    extractor.prepare(datamodule, ctx.device)
    ref = load_or_compute(datamodule, ctx.split, extractor, ctx.reference_n, ctx.cache_dir,
                          batch_size=ctx.batch_size, use_cache=ctx.use_cache)
    out = run_sample_metrics(metrics, source, extractor, ref, ctx.batch_size, ctx.seed, keep_images=ctx.save_samples)
    files = []
    if ctx.save_samples and out["images"] is not None:
        from gencli.io import auto_scale, from_uint8, save_image_grid, save_npz

        save_npz(ctx.out_dir / "samples.npz", out["images"])
        grid = from_uint8(out["images"][:64])
        save_image_grid(ctx.out_dir / "samples.png", grid, scale=auto_scale(grid.shape[-1]))
        files = ["samples.npz", "samples.png"]
    common = {
        "features": extractor.describe(),
        "reference": ref.describe(),
        "generated": source.describe(),
        "seed": ctx.seed,
        "timing": {"seconds": round(out["seconds"], 3), "images_per_second": round(out["images_per_second"], 1),
                   "note": "sampling + feature extraction; not part of the numbers"},
    }
    results = {}
    for metric in metrics:
        results[id(metric)] = MetricResult(values=out["values"][id(metric)],
                                           provenance={"metric": metric.settings(), **common}, files=files)
        files = []  # list the saved samples once
    ctx.shared["sample_pass"] = results
    log.info("sample metrics: %d images at %.1f images/s", source.n, out["images_per_second"])
    return results
