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

Shared by several processes (``shard=``, :class:`Shard`: the SampleQuality callback under DDP), the
pass is split, not repeated: of ``n`` images, process ``r`` of ``W`` generates the contiguous block
``n*r//W .. n*(r+1)//W - 1`` (image ``i`` is the same image whatever ``W``: per-image seeds) and
extracts its features, and the metric states are combined by torchmetrics' own distributed sync at
``compute()``: FID's sums are summed over the ranks, KID's and IS's feature lists gathered in rank
order (so the concatenation is images 0..n-1 in order, and the seeded subsets and splits pick the
same images as in one process). Each list state holds exactly one tensor per rank before the sync
(torchmetrics gathers a list element by element, and ranks with different numbers of batches would
enter different numbers of collectives). The real side is held by rank 0 alone (the other ranks keep
zero sums and an empty bank), so the summed or gathered states count it once. PRDC all-gathers the
generated features (first ``max_samples`` in image order). The gathers run on the process group's
device (the rank's GPU under NCCL) and the states come back to the CPU, where every rank computes
the same float64 numbers from the same combined states: the values equal one process's up to the
order of a few float64 sums (and, for blocks batched differently, float32 kernels' rounding).

Metric names carry the extractor: ``fid``, ``kid``, ``is`` ... for Inception (comparable with papers),
``fid_domain``, ``kid_domain``, ``is_domain`` ... for the domain classifier (not comparable).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.metrics.base import EvalContext, EvalMetric, MetricResult
from gencli.metrics.domain import key_hash
from gencli.metrics.prdc import prdc
from gencli.metrics.reference import ReferenceStats, load_or_compute, load_or_compute_images
from gencli.metrics.sources import FileSource, ImageSource, ModelSource, quantise
from gencli.metrics.timing import timed
from gencli.progress import track_batches

log = logging.getLogger(__name__)

#: torchmetrics must not try to all-gather states: only one process computes these (unless a Shard says otherwise).
METRIC_KWARGS = {"sync_on_compute": False}


# ----------------------------------------------------------------------------- several processes
@dataclass(frozen=True)
class Shard:
    """This process's share of a pass split across the ``world_size`` processes of torch.distributed's default group.

    ``device`` is where collectives run: the rank's CUDA device under NCCL, the CPU under gloo.
    """

    rank: int
    world_size: int
    device: torch.device = torch.device("cpu")

    @classmethod
    def of_process_group(cls, device: torch.device | str | None = None) -> Shard | None:
        """This process's Shard when torch.distributed is initialised with 2 or more processes, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        device = torch.device(device or "cpu")
        backend = str(dist.get_backend())
        on_device = device.type != "cpu" and backend not in ("gloo", "mpi") and not backend.startswith("cpu:") \
            and ",cpu:" not in backend
        return cls(dist.get_rank(), dist.get_world_size(), device if on_device else torch.device("cpu"))

    def block(self, n: int) -> tuple[int, int]:
        """``(start, stop)``: this rank's contiguous block of images ``0 .. n-1`` (sizes differ by at most one)."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def gather(self, tensor: Tensor, group: Any = None) -> list[Tensor]:
        """Every rank's ``tensor`` (shapes may differ in their sizes), in rank order, on ``tensor``'s device.

        torchmetrics' ``gather_all_tensors`` on the backend's device: the ``dist_sync_fn`` of gencli's metrics.
        """
        from torchmetrics.utilities.distributed import gather_all_tensors

        return [t.to(tensor.device) for t in gather_all_tensors(tensor.to(self.device), group)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (a collective: every rank must call it)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def metric_kwargs(shard: Shard | None) -> dict[str, Any]:
    """torchmetrics keyword arguments: no sync in one process; its own sync over ``shard``'s ranks otherwise."""
    if shard is None:
        return dict(METRIC_KWARGS)
    return {"sync_on_compute": True, "dist_sync_fn": shard.gather}


def one_tensor_per_rank(metric, names: tuple[str, ...], dim: int) -> None:
    """Concatenate each list state of ``metric`` into a single tensor ((0, dim) when empty) before the sync.

    torchmetrics gathers a list state (``dist_reduce_fx=None``) one element at a time: ranks holding different
    numbers of batches would enter different numbers of collectives, and one would wait forever.
    """
    for name in names:
        parts = getattr(metric, name)
        setattr(metric, name, [torch.cat(parts) if parts else torch.zeros(0, dim, dtype=torch.float64)])


class ModelBlock(ImageSource):
    """Images ``start .. stop - 1`` of a :class:`ModelSource`: each from its own (seed, i) generator, so the
    same images as in the whole pass, whatever the blocks."""

    def __init__(self, source: ModelSource, start: int, stop: int):
        self.source, self.start, self.stop = source, int(start), int(stop)
        self.n = self.stop - self.start

    @torch.no_grad()
    def stream(self, batch_size: int):
        from gencli.seeds import PerImageGenerator

        for start in range(self.start, self.stop, int(batch_size)):
            generator = PerImageGenerator.for_range(self.source.seed, start, min(int(batch_size), self.stop - start))
            yield quantise(self.source.generate(generator))

    def labels_for(self, start: int, count: int):
        return self.source.labels_for(self.start + start, count)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "images_here": [self.start, self.stop]}


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
    #: Fed each batch's class labels (conditional metrics); the reference then carries the real images' labels.
    needs_labels = False

    def unavailable(self, ctx: EvalContext) -> str | None:
        """Why this metric cannot run in this eval (it is then left out of the shared pass), or None."""
        return None

    def begin(self, ref: ReferenceStats, n_fake: int, shard: Shard | None = None) -> None:
        """Start a pass of ``n_fake`` generated images (all ranks' together when ``shard`` is given)."""
        raise NotImplementedError

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        """One batch: features (N, D), logits (N, K) or None, the images' class labels (N,) or None."""
        raise NotImplementedError

    def finish(self) -> dict[str, float]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}

    def reader_notes(self) -> list[str]:
        """What a reader must see beside this pass's numbers (printed under the table and kept in metrics.json):
        a FID of identical sets rounded to 0, a negative KID. Set by finish()."""
        return list(getattr(self, "printed_notes", []))

    def __call__(self, ctx: EvalContext) -> MetricResult:
        results = shared_pass(ctx, self)
        return results[id(self)]


class FIDMetric(SampleMetric):
    """Fréchet distance (Heusel et al. 2017) by torchmetrics' FrechetInceptionDistance, in float64."""

    name = "fid"

    def begin(self, ref: ReferenceStats, n_fake: int, shard: Shard | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=PrecomputedFeatures(ref.features.shape[1]), **metric_kwargs(shard))
        if shard is None or shard.rank == 0:  # the sync sums every state over the ranks: the real side counts once
            self.metric.real_features_sum = torch.from_numpy(np.asarray(ref.feature_sum, dtype=np.float64)).clone()
            self.metric.real_features_cov_sum = torch.from_numpy(np.asarray(ref.outer_sum, dtype=np.float64)).clone()
            self.metric.real_features_num_samples = torch.tensor(int(ref.n), dtype=torch.long)
        self.shard = shard
        self.notes, self.printed_notes = [], []
        dim = ref.features.shape[1]
        if min(ref.n, n_fake) <= dim:
            self.notes.append(f"fewer images (real {ref.n}, generated {n_fake}) than feature dimensions ({dim}): the "
                              "covariances are rank-deficient and FID is biased upwards; use n > D")

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        self.metric.update(features.double(), real=False)

    def finish(self) -> dict[str, float]:
        value = float(self.metric.compute())
        if value < 0:  # rare: the covariances are only needed to know how much rounding explains
            sync = self.metric.sync_context(dist_sync_fn=self.shard.gather if self.shard is not None else None,
                                            should_sync=self.shard is not None)
            with sync:  # under a Shard: the combined states (every rank takes this branch: same value everywhere)
                cov_real, cov_fake = fid_covariances(self.metric)
            value, note = settle_fid(value, cov_real, cov_fake)
            self.notes.append(note)
            self.printed_notes.append(note)
        return {"fid": value}

    def settings(self) -> dict[str, Any]:
        return {"implementation": "torchmetrics FrechetInceptionDistance on precomputed features (float64)",
                **({"notes": self.notes} if self.notes else {})}


def fid_covariances(metric) -> tuple[Tensor, Tensor]:
    """The real and generated covariances of a torchmetrics FrechetInceptionDistance's states, by its own formula."""
    covs = []
    for side in ("real", "fake"):
        n = getattr(metric, f"{side}_features_num_samples")
        mean = (getattr(metric, f"{side}_features_sum") / n).unsqueeze(0)
        covs.append((getattr(metric, f"{side}_features_cov_sum") - n * mean.t().mm(mean)) / (n - 1))
    return covs[0].double(), covs[1].double()


def fid_rounding_tolerance(cov_real: Tensor, cov_fake: Tensor) -> float:
    """How far below 0 float64 rounding can take ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` of (nearly)
    identical sets.

    The eigenvalues of ``S1 S2`` are found to about ``eps ||S1|| ||S2||``; the square root turns that error, for
    the (near-)zero eigenvalues of rank-deficient covariances, into ``sqrt(eps ||S1|| ||S2||)`` each, and ``2 Tr``
    sums D of them. Identical sets measured at D = 64..512 dims with fewer images than dims come out at about a
    quarter of this bound (and at 1e-15 of the trace with full-rank covariances); the trace terms add a few eps.
    """
    eps = torch.finfo(torch.float64).eps
    dim = int(cov_real.shape[0])
    norm_real = float(torch.linalg.eigvalsh(cov_real).abs().max()) if dim else 0.0
    norm_fake = float(torch.linalg.eigvalsh(cov_fake).abs().max()) if dim else 0.0
    traces = abs(float(cov_real.trace())) + abs(float(cov_fake.trace()))
    return 2 * dim * (eps * norm_real * norm_fake) ** 0.5 + 16 * dim * eps * traces


def settle_fid(value: float, cov_real: Tensor, cov_fake: Tensor, what: str = "FID") -> tuple[float, str | None]:
    """A Fréchet distance is never negative: a value below 0 by no more than float64 rounding is reported as 0, with a
    note holding the raw value; one further below is a numerical failure, raised (never clamped silently)."""
    if not value < 0:  # >= 0, or NaN (left for the caller to show as it is)
        return value, None
    tolerance = fid_rounding_tolerance(cov_real, cov_fake)
    if value >= -tolerance:
        return 0.0, (f"{what} computed as {value:.3g}, within float64 rounding of 0 (tolerance {tolerance:.2g} for these "
                     f"{int(cov_real.shape[0])}-d features): reported as 0, the two image sets have the same feature "
                     "statistics up to rounding")
    from gencli.errors import RuntimeFailure

    raise RuntimeFailure(
        f"{what} came out as {value:.6g}, below -{tolerance:.2g}, the most float64 rounding can explain for these "
        f"{int(cov_real.shape[0])}-d features: a Fréchet distance cannot be negative, so the features or their "
        "statistics are broken (non-finite features, a corrupted reference cache). Recompute the reference "
        "statistics with reference.cache=false; if it persists, report it with the command line.")


class KIDMetric(SampleMetric):
    """Kernel distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over subsets.

    The estimator is unbiased, so for two sets from one distribution it scatters around 0 and can be slightly
    negative: the value is reported as computed (clamping it would bias it upwards), with a note saying so.
    """

    name = "kid"

    def __init__(self, subsets: int = 100, subset_size: int = 1000, degree: int = 3, coef: float = 1.0,
                 gamma: float | None = None):
        self.subsets, self.subset_size = at_least("kid.subsets", subsets, 1), at_least("kid.subset_size", subset_size, 2)
        self.degree = at_least("kid.degree", degree, 1)
        self.coef = at_least("kid.coef", coef, 1e-12, float)  # torchmetrics wants a float > 0 (an int 1 fails)
        self.gamma = None if gamma is None else at_least("kid.gamma", gamma, 1e-12, float)

    def begin(self, ref: ReferenceStats, n_fake: int, shard: Shard | None = None) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance

        self.used_subset_size = min(self.subset_size, ref.n, n_fake)
        if self.used_subset_size < 2:
            raise ConfigError("KID needs at least 2 real and 2 generated images.")
        with warnings.catch_warnings():  # "will save all extracted features in buffer": features only, n x D
            warnings.simplefilter("ignore", UserWarning)
            self.metric = KernelInceptionDistance(
                feature=PrecomputedFeatures(ref.features.shape[1]), subsets=self.subsets,
                subset_size=self.used_subset_size, degree=self.degree, gamma=self.gamma, coef=self.coef,
                **metric_kwargs(shard),
            )
        self.shard, self.dim = shard, int(ref.features.shape[1])
        if shard is None or shard.rank == 0:  # the sync gathers every rank's bank: the real one is held once
            self.metric.real_features.append(ref.features.double())

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        self.metric.update(features.double(), real=False)

    def finish(self) -> dict[str, float]:
        if self.shard is not None:
            one_tensor_per_rank(self.metric, ("real_features", "fake_features"), self.dim)
        mean, std = self.metric.compute()
        self.printed_notes = []
        if float(mean) < 0:
            self.printed_notes.append(
                f"KID is {float(mean):.3g} (std {float(std):.2g} over subsets): KID is an unbiased estimate of a squared "
                "distance, which scatters around 0 when the two sets are alike; a slightly negative value means no "
                "measurable difference and is reported unclamped")
        return {"kid": float(mean), "kid_std": float(std)}

    def settings(self) -> dict[str, Any]:
        return {"implementation": "torchmetrics KernelInceptionDistance on precomputed features (float64)",
                "subsets": self.subsets, "subset_size": self.used_subset_size, "subset_size_asked": self.subset_size,
                "kernel": f"(x.y * {self.gamma if self.gamma is not None else '1/d'} + {self.coef:g})^{self.degree}",
                "estimator": "unbiased MMD^2: may be slightly negative for alike sets; reported unclamped",
                **({"notes": self.printed_notes} if getattr(self, "printed_notes", None) else {})}


class ISMetric(SampleMetric):
    """Inception Score (Salimans et al. 2016) by torchmetrics' InceptionScore, on the extractor's logits."""

    name = "is"
    needs_logits = True

    def __init__(self, splits: int = 10):
        self.splits = at_least("is.splits", splits, 1)

    def begin(self, ref: ReferenceStats, n_fake: int, shard: Shard | None = None) -> None:
        from torchmetrics.image.inception import InceptionScore

        if shard is not None and n_fake < shard.world_size:  # the same check, and error, on every rank
            raise ConfigError(f"IS split across {shard.world_size} processes needs at least one generated image per "
                              f"process (n={n_fake}); raise n.")
        self.shard = shard
        self.used_splits = max(1, min(self.splits, n_fake))
        with warnings.catch_warnings():  # "will save all extracted features in buffer": logits only, n x K
            warnings.simplefilter("ignore", UserWarning)
            self.metric = InceptionScore(feature=PrecomputedFeatures(1), splits=self.used_splits, **metric_kwargs(shard))

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        if logits is None:
            raise ConfigError("metric=is needs a feature extractor with class logits (inception or domain).")
        self.metric.update(logits.double())

    def finish(self) -> dict[str, float]:
        if self.shard is not None:
            one_tensor_per_rank(self.metric, ("features",), 0)  # never empty: every rank has an image
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

    def begin(self, ref: ReferenceStats, n_fake: int, shard: Shard | None = None) -> None:
        self.real = ref.features[: self.max_samples]
        self.fake: list[Tensor] = []
        self.kept = 0
        self.shard, self.dim = shard, int(ref.features.shape[1])
        if min(len(self.real), min(n_fake, self.max_samples)) <= self.nearest_k:
            raise ConfigError(f"PRDC with nearest_k={self.nearest_k} needs more than {self.nearest_k} real and generated "
                              "images; raise n.")

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        take = features[: max(0, self.max_samples - self.kept)]
        if len(take):
            self.fake.append(take)
            self.kept += len(take)

    def finish(self) -> dict[str, float]:
        fake = torch.cat(self.fake) if self.fake else torch.zeros(0, self.dim)
        if self.shard is not None:  # every rank's first max_samples, in rank (= image) order: the first max_samples
            fake = torch.cat(self.shard.gather(fake))[: self.max_samples]
            self.kept = len(fake)
        return prdc(self.real, fake, k=self.nearest_k, chunk=self.chunk)

    def settings(self) -> dict[str, Any]:
        return {"implementation": "gencli.metrics.prdc (closed k-NN balls, float64)", "nearest_k": self.nearest_k,
                "n_real_used": len(self.real), "n_generated_used": self.kept, "max_samples": self.max_samples}


# ----------------------------------------------------------------------------- the pass
def run_sample_metrics(metrics: list[SampleMetric], source: ImageSource, extractor, ref: ReferenceStats,
                       batch_size: int, seed: int, keep_images: bool = False,
                       description: str = "generated images", shard: Shard | None = None) -> dict[str, Any]:
    """Stream ``source`` through ``extractor`` into every metric; return values, timing and (optionally) images.

    With ``shard``, every process of the group calls this with the same arguments: each generates its own block
    of the ``source.n`` images (``source`` must be a :class:`ModelSource`), and every process returns the values
    of all ``source.n`` images (``images`` then holds this process's block only).
    """
    local = source
    if shard is not None:
        if not isinstance(source, ModelSource):
            raise TypeError(f"a pass split across processes generates its images: {type(source).__name__} is not a "
                            "ModelSource")
        local = ModelBlock(source, *shard.block(source.n))
    with timed("metrics"):
        for metric in metrics:
            if shard is None:
                metric.begin(ref, source.n)
            else:
                metric.begin(ref, source.n, shard=shard)
    kept: list[np.ndarray] = []
    start = time.perf_counter()
    error = None
    try:
        done = 0
        for _, (images, u8) in zip(track_batches(local.n, batch_size, description), local.stream(batch_size)):
            with timed("features"):
                features, logits = extractor.extract(images)
            labels = local.labels_for(done, len(images)) if any(m.needs_labels for m in metrics) else None
            done += len(images)
            with timed("metrics"):
                for metric in metrics:
                    metric.update(features, logits, labels)
            if keep_images:
                kept.append(u8)
        if shard is not None and local.n == 0:  # more ranks than images: this one joins with no features
            for metric in metrics:
                metric.update(torch.zeros(0, int(ref.features.shape[1])), None,
                              torch.zeros(0, dtype=torch.long) if metric.needs_labels else None)
    except Exception as err:  # noqa: BLE001 - under a shard, raised on every rank after the check below
        if shard is None:
            raise
        error = err
    if shard is not None:  # a rank that failed must not leave the others waiting in the metrics' sync
        raise_if_any(shard, shard.all_gather_object(describe_failure(error)), error, "while generating its images")
    seconds = time.perf_counter() - start
    values: dict[int, dict[str, float]] = {}
    suffix = metric_suffix(extractor)
    for metric in metrics:
        with timed("metrics"), torch.random.fork_rng(devices=[]):  # KID subsets, IS split order: seeded
            torch.manual_seed(seed)
            values[id(metric)] = {f"{k}{suffix}" if not k.endswith("_std") else f"{k[:-4]}{suffix}_std": v
                                  for k, v in metric.finish().items()}
    return {"values": values, "seconds": seconds, "images_per_second": local.n / max(seconds, 1e-9),
            "n_here": local.n, "images": np.concatenate(kept) if kept else None}


def prepare_features_and_reference(extractor, datamodule, device: torch.device, split: str, reference_n: int | None,
                                   cache_dir, batch_size: int, use_cache: bool = True,
                                   shard: Shard | None = None) -> ReferenceStats:
    """``extractor.prepare`` then the reference statistics of ``split``; with ``shard``, on every rank, race-free.

    Rank 0 goes first: it trains the domain classifier (or loads it) and computes (or loads) the reference
    statistics, writing both caches; then the other ranks load them from the caches, so no two processes write
    one cache entry. Without the reference cache (``use_cache=False``), every rank computes the statistics
    itself, writing nothing. Every rank joins the same two collectives whatever happens: an error on one rank
    is raised on every rank (its own exception where it happened), and ranks that ended up with different
    feature extractors or reference statistics (caches not shared between machines) stop with an error rather
    than mix feature spaces.
    """

    def features() -> None:
        with timed("setup"):
            extractor.prepare(datamodule, device)

    def reference() -> ReferenceStats:
        return load_or_compute(datamodule, split, extractor, reference_n, cache_dir, batch_size=batch_size,
                               use_cache=use_cache)

    if shard is None:
        features()
        return reference()
    cached = bool(use_cache and cache_dir)
    ref, error = None, None
    if shard.rank == 0:
        try:
            features()
            if cached:
                ref = reference()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective every rank joins
            error = err
    raise_if_any(shard, shard.all_gather_object(describe_failure(error)), error, "while rank 0 prepared")
    try:
        if shard.rank != 0:
            features()
        if ref is None:
            ref = reference()
        fingerprint = {"features": key_hash(extractor.identity()), "reference": key_hash(ref.key), "n_real": ref.n,
                       "feature_dim": int(ref.features.shape[1])}
    except Exception as err:  # noqa: BLE001
        error, fingerprint = err, None
    answers = shard.all_gather_object(describe_failure(error) or {"fingerprint": fingerprint})
    raise_if_any(shard, answers, error, "while preparing the feature extractor and the reference statistics")
    if any(answer["fingerprint"] != fingerprint for answer in answers):
        from gencli.errors import RuntimeFailure

        raise RuntimeFailure(
            f"the {shard.world_size} processes prepared different feature extractors or reference statistics "
            f"({[answer['fingerprint'] for answer in answers]}): the domain classifier and the reference statistics "
            f"are trained and computed by rank 0 and read by the other ranks from the cache ({cache_dir}), which must "
            "be one folder that every process sees (a shared file system on several machines)."
        )
    return ref


def describe_failure(error: BaseException | None) -> dict[str, Any] | None:
    if error is None:
        return None
    from gencli.errors import GencliError

    return {"error": type(error).__name__, "message": str(error),
            "exit_code": error.exit_code if isinstance(error, GencliError) else None}


def raise_if_any(shard: Shard, answers: list[dict | None], own: BaseException | None, stage: str) -> None:
    """Raise on every rank when any rank failed: a rank's own exception where it happened, else the first one's."""
    if own is not None:
        raise own
    failed = [(rank, answer) for rank, answer in enumerate(answers) if answer is not None and "error" in answer]
    if not failed:
        return
    from gencli.errors import GencliError

    rank, answer = failed[0]
    if answer["exit_code"] is not None:  # the same gencli error (and exit code) on every rank
        raise GencliError(answer["message"], answer["exit_code"])
    raise GencliError(f"rank {rank} of {shard.world_size} failed {stage}: {answer['error']}: {answer['message']}", 1)


def real_images(ctx: EvalContext, names: str):
    """The real images the samples are compared with: ``ref=`` files, else the data split ``split``."""
    from gencli.metrics.reference import FileImages, SplitImages

    if ctx.ref:
        if ctx.datamodule is None:
            return FileImages(ctx.ref)
        return FileImages(ctx.ref, ctx.datamodule.image_shape, ctx.datamodule.name)
    return SplitImages(ctx.require_data(names), ctx.split)


def label_classes(ctx: EvalContext, extractor=None) -> list[tuple[int, str]]:
    """(number of classes, whose classes) of everything in this eval that knows the classes: the domain
    classifier (once prepared), a conditional checkpoint, the data set."""
    found = []
    if extractor is not None and (k := extractor.num_classes()) is not None:
        found.append((int(k), f"the domain classifier (features={extractor.name})"))
    if ctx.model is not None and getattr(ctx.model, "conditional", False):
        found.append((int(ctx.model.num_classes), f"ckpt={ctx.ckpt}"))
    names = ctx.datamodule.classes() if ctx.datamodule is not None and hasattr(ctx.datamodule, "classes") else None
    if names:
        found.append((len(names), f"data={ctx.datamodule.name}"))
    return found


def check_file_labels(ctx: EvalContext, real, source: ImageSource, extractor=None,
                      classes: list[tuple[int, str]] | None = None) -> None:
    """Refuse (ConfigError) class labels of samples= / ref= files outside the classes that the classifier, the
    checkpoint or the data set know: a label -1 or 10**12 would count as a wrong class, silently."""
    files = [f for f in (source, getattr(real, "source", None)) if isinstance(f, FileSource) and f.labels is not None]
    known = label_classes(ctx, extractor) if classes is None else classes
    for num_classes, whose in known or [(None, "")]:  # classes not known yet: at least no negative label
        for file in files:
            file.check_labels(num_classes, whose)


def make_source(ctx: EvalContext, real) -> ImageSource:
    if ctx.samples:
        return FileSource(ctx.samples, real.image_shape, n=ctx.n,
                          data_name=f"ref={ctx.ref}" if ctx.ref else real.datamodule.name)
    if ctx.model is None:
        raise ConfigError("sample metrics need ckpt=PATH (to generate images) or samples=DIR|file.npz.")
    return ModelSource(ctx.model, ctx.n, ctx.seed, ctx.sample_options, ckpt=ctx.ckpt, labels=ctx.labels,
                       hardware=ctx.sampling_hardware)


def shared_pass(ctx: EvalContext, requester: SampleMetric) -> dict[int, MetricResult]:
    """Run the one pass for every sample metric of this eval run (once), return each one's result."""
    if "sample_pass" in ctx.shared:
        return ctx.shared["sample_pass"]
    metrics = [m for m in (ctx.metrics or {}).values() if isinstance(m, SampleMetric) and m.unavailable(ctx) is None]
    if requester not in metrics:
        metrics.append(requester)
    names = ", ".join(m.name for m in metrics)
    if ctx.features is None:
        raise ConfigError(f"metric {names} needs a feature extractor: features=domain or features=inception.")
    with timed("io"):  # ref= / samples= files are opened (and an .npz read) here
        real = real_images(ctx, names)
        source = make_source(ctx, real)  # shape errors before any classifier training or data pass
    labelled = any(m.needs_labels for m in metrics)
    if labelled:  # labels outside the classes known so far: refused before the classifier and the reference pass
        check_file_labels(ctx, real, source)
    extractor = ctx.features
    with timed("setup"):
        extractor.prepare(ctx.datamodule if ctx.datamodule is not None else real, ctx.device)
    if labelled:
        check_file_labels(ctx, real, source, extractor)
    ref = load_or_compute_images(real, extractor, ctx.reference_n, ctx.cache_dir, batch_size=ctx.batch_size,
                                 use_cache=ctx.use_cache)
    if labelled:  # the reference holds the first ref.n real images: their labels
        ref.labels = real.labels(ref.n)
        if not label_classes(ctx, extractor) and ref.labels is not None and len(ref.labels):
            # nothing else knows the classes (ref= files, features=inception): the real images' labels do
            classes = int(ref.labels.max()) + 1
            check_file_labels(ctx, real, source, classes=[(classes, f"the real images' labels (ref={ctx.ref})")])
    out = run_sample_metrics(metrics, source, extractor, ref, ctx.batch_size, ctx.seed, keep_images=ctx.save_samples)
    files = []
    if ctx.save_samples and out["images"] is not None:
        from gencli.io import auto_scale, from_uint8, save_image_grid, save_npz

        with timed("io"):
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
    measured_on = f"{extractor.summary()}: {source.n} generated vs {ref.where()}"
    caveat = extractor.caveat()
    for metric in metrics:
        values = out["values"][id(metric)]
        results[id(metric)] = MetricResult(values=values, provenance={"metric": metric.settings(), **common},
                                           files=files, rows=dict.fromkeys(values, measured_on),
                                           notes=([caveat] if caveat else []) + metric.reader_notes())
        files = []  # list the saved samples once
    ctx.shared["sample_pass"] = results
    if isinstance(source, ModelSource):
        ctx.shared["sampling_cost"] = source.cost()  # what the samples cost: for NFE-vs-quality tables
        for result in results.values():
            result.notes.append(source.cost_note())
    log.info("sample metrics: %d images at %.1f images/s", source.n, out["images_per_second"])
    return results
