"""Metrics of class-conditional generation: was the requested class produced, and how well is each class drawn?

- :class:`ClassAccuracy` (``metric=class_accuracy``): the domain classifier's top-1 accuracy on generated images
  against the labels they were generated for, overall and per class (the "classification accuracy" of
  conditional GAN papers: Odena et al. 2017's AC-GAN accuracy, Miyato & Koyama 2018). Only the domain classifier
  knows the data's classes: Inception's logits are ImageNet classes, so with ``features=inception`` the metric
  refuses itself.
- :class:`IntraFID` (``metric=intra_fid``): the FID of each class's generated images against that class's real
  images, and their mean (Miyato & Koyama 2018's intra-FID), on the same features as FID.

Both run in the one shared pass of the sample metrics (:mod:`gencli.metrics.sample_metrics`): they receive each
batch's labels, from the model's label plan (``labels=``, class-balanced by default) or from the ``labels`` array
of a ``samples=`` .npz written by ``gencli sample``. The real images' labels come from the data split (the first
n of the split, the same images the reference statistics hold).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from gencli.errors import ConfigError
from gencli.metrics.base import EvalContext, MetricResult
from gencli.metrics.sample_metrics import SampleMetric, Shard, at_least, settle_fid


class ClassMetric(SampleMetric):
    """A sample metric that needs the class of every generated image (and of the real ones)."""

    needs_labels = True
    #: compares with the real images of each class (so ref= files must carry labels)
    needs_real_labels = True

    def __init__(self, optional: bool = False):
        #: In metric=all: skipped, with a note, for unconditional models and unlabelled samples.
        self.optional = bool(optional)

    def unavailable(self, ctx: EvalContext) -> str | None:
        if self.needs_real_labels and ctx.ref and not samples_have_labels(ctx.ref):
            return f"ref={ctx.ref} holds no 'labels' array (the real images' classes)"
        return unlabelled(ctx)

    def __call__(self, ctx: EvalContext) -> MetricResult:
        why = self.unavailable(ctx)
        if why is not None:
            if self.optional:
                # images without classes (an unconditional model): recorded, not printed, as it does not apply; labelled
                # images whose reference lacks labels: a printed note, as the user may want the number
                key = "not_applicable" if unlabelled(ctx) is not None else "skipped"
                return MetricResult(values={}, provenance={key: f"{self.name} skipped: {why}"})
            raise ConfigError(f"metric={self.name} judges class-conditional generation, but {why}. Evaluate a "
                              "checkpoint trained with model.conditional=true (or samples from one) with "
                              "features=domain.")
        return super().__call__(ctx)

    def begin(self, ref, n_fake: int, shard: Shard | None = None) -> None:
        if self.needs_real_labels and ref.labels is None:
            raise ConfigError(f"metric={self.name} needs the real images' labels, and the reference has none (ref= "
                              "files carry them only as an .npz's 'labels' array).")
        self.shard = shard
        self.labels: list[Tensor] = []
        self.rows: list[Tensor] = []

    def update(self, features: Tensor, logits: Tensor | None, labels: Tensor | None = None) -> None:
        if labels is None:
            raise ConfigError(f"metric={self.name} needs the class of every generated image; these samples carry none "
                              "(a samples= .npz written by 'gencli sample' of a conditional model has them).")
        self.labels.append(labels.cpu().long())
        self.rows.append(self.row(features, logits))

    def row(self, features: Tensor, logits: Tensor | None) -> Tensor:
        raise NotImplementedError

    def gathered(self) -> tuple[Tensor, Tensor]:
        """(rows, labels) of every generated image, all ranks' under a Shard, in image order."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        if self.shard is not None:
            rows = torch.cat(self.shard.gather(rows))
            labels = torch.cat(self.shard.gather(labels))
        return rows, labels


def unlabelled(ctx: EvalContext) -> str | None:
    """Why this eval run has no class labels to judge, or None when it has them."""
    if ctx.samples:
        if "samples_have_labels" not in ctx.shared:  # asked by every class metric and the pass: open the file once
            ctx.shared["samples_have_labels"] = samples_have_labels(ctx.samples)
        return None if ctx.labels is not None or ctx.shared["samples_have_labels"] else (
            f"samples={ctx.samples} holds no 'labels' array")
    if ctx.model is None or not getattr(ctx.model, "conditional", False):
        return f"ckpt={ctx.ckpt} holds an unconditional model"
    return None


def samples_have_labels(path: str) -> bool:
    from pathlib import Path

    path = Path(str(path)).expanduser()
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path) as archive:
            return "labels" in archive.files
    except (OSError, ValueError):
        return False


class ClassAccuracy(ClassMetric):
    """Top-1 accuracy of the domain classifier on generated images against their requested labels."""

    name = "class_accuracy"
    needs_logits = True
    needs_real_labels = False

    def unavailable(self, ctx: EvalContext) -> str | None:
        name = getattr(ctx.features, "name", None)
        if name is not None and name != "domain":
            return (f"features={name} has no classes of this data set (only the domain classifier, features=domain, "
                    "knows them)")
        return super().unavailable(ctx)

    def row(self, features: Tensor, logits: Tensor | None) -> Tensor:
        if logits is None:
            raise ConfigError("metric=class_accuracy needs the domain classifier's class logits (features=domain).")
        return logits.argmax(1)

    def finish(self) -> dict[str, float]:
        predicted, labels = self.gathered()
        right = (predicted == labels).double()
        self.per_class = {int(k): float(right[labels == k].mean()) for k in labels.unique().tolist()}
        self.confusions = most_confused(predicted, labels)
        return {"class_accuracy": float(right.mean())}

    def settings(self) -> dict[str, Any]:
        return {"what": "top-1 accuracy of the domain classifier on generated images, against the labels they were "
                        "generated for", "per_class": self.per_class, "most_confused": self.confusions}


def most_confused(predicted: Tensor, labels: Tensor, top: int = 5) -> list[dict[str, int]]:
    """The most frequent (requested, predicted) mistakes."""
    wrong = predicted != labels
    pairs, counts = torch.stack([labels[wrong], predicted[wrong]], 1).unique(dim=0, return_counts=True) \
        if wrong.any() else (torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    order = counts.argsort(descending=True)[:top]
    return [{"requested": int(pairs[i, 0]), "classified_as": int(pairs[i, 1]), "images": int(counts[i])} for i in order]


class IntraFID(ClassMetric):
    """FID per class (generated images of class c against real images of class c) and the mean over classes."""

    name = "intra_fid"

    def __init__(self, optional: bool = False, min_images: int = 2):
        super().__init__(optional)
        self.min_images = at_least("intra_fid.min_images", min_images, 2)

    def begin(self, ref, n_fake: int, shard: Shard | None = None) -> None:
        super().begin(ref, n_fake, shard)
        self.real = ref.features.double()
        self.real_labels = torch.as_tensor(ref.labels).long()[: len(self.real)]

    def row(self, features: Tensor, logits: Tensor | None) -> Tensor:
        return features.double()

    def finish(self) -> dict[str, float]:
        fake, labels = self.gathered()
        self.per_class, self.counts, self.notes = {}, {}, []
        dim = self.real.shape[1]
        for k in labels.unique().tolist():
            real_k, fake_k = self.real[self.real_labels == k], fake[labels == k]
            self.counts[int(k)] = {"real": len(real_k), "generated": len(fake_k)}
            if min(len(real_k), len(fake_k)) < self.min_images:
                self.notes.append(f"class {k}: {len(real_k)} real and {len(fake_k)} generated images, fewer than "
                                  f"{self.min_images}: left out of the mean")
                continue
            self.per_class[int(k)] = frechet_distance(real_k, fake_k, self.notes, f"class {k}'s FID")
        if not self.per_class:
            raise ConfigError("intra-FID: no class has enough real and generated images; raise n (and reference.n).")
        smallest = min(min(c["real"], c["generated"]) for c in self.counts.values())
        if smallest <= dim:
            self.notes.append(f"per class as few as {smallest} images for {dim}-d features: each class's covariances are "
                              "rank-deficient and its FID is biased upwards (compare runs at the same n only)")
        return {"intra_fid": float(np.mean(list(self.per_class.values())))}

    def settings(self) -> dict[str, Any]:
        return {"what": "mean over classes of FID(generated images of class c, real images of class c) "
                        "(Miyato & Koyama 2018)", "per_class": self.per_class, "images_per_class": self.counts,
                **({"notes": self.notes} if self.notes else {})}


def frechet_distance(real: Tensor, fake: Tensor, notes: list[str] | None = None, what: str = "FID") -> float:
    """FID between two float64 feature sets, by torchmetrics' own formula (the one FIDMetric uses); a value below 0
    by rounding alone is 0, with a note appended to ``notes`` (:func:`~gencli.metrics.sample_metrics.settle_fid`)."""
    from torchmetrics.image.fid import _compute_fid

    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    value, note = settle_fid(float(_compute_fid(mu_r, cov_r, mu_f, cov_f)), cov_r, cov_f, what)
    if note is not None and notes is not None:
        notes.append(note)
    return value


CLASS_METRICS = {"class_accuracy": ClassAccuracy, "intra_fid": IntraFID}


def add_class_metrics(metrics: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
    """For a conditional checkpoint (or labelled samples), every eval with sample metrics also judges the classes:
    class_accuracy and intra_fid join the requested metrics (unless already there)."""
    if unlabelled(ctx) is not None or not any(isinstance(m, SampleMetric) for m in metrics.values()):
        return metrics
    added = {name: cls(optional=True) for name, cls in CLASS_METRICS.items() if name not in metrics}
    return {**metrics, **added}
