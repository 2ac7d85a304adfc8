"""Reference statistics of the real images, computed once and cached on disk.

For one (data set, split, feature extractor, n, transform) the real images pass through the extractor
once; what FID needs (the feature sum and the sum of outer products, float64: exactly the
``real_features_sum``/``real_features_cov_sum`` states of torchmetrics' FID) and the feature bank
KID and PRDC need (float32, n x D) are stored under
``<cache_dir>/reference/<data>-<split>-<extractor>-<hash>/`` as ``stats.npz`` plus ``manifest.json``
(the full key, n, D, versions, timing). The key holds the data module's ``describe()`` (name, image
size, channels, seed, split fraction, max_images, random_flip, source split or folder root and resize
policy), the split, the extractor's
identity (name, weights sha256, input transform) and n, so any change to those misses.

The real images are a data split (:class:`SplitImages`) or, for ``gencli eval samples=A ref=B``, any folder or
.npz of images (:class:`FileImages`, keyed by a sha256 of the files' bytes: an edited file misses).

On a hit nothing touches the data set: the data module is never set up (its files are not read).
The manifest is written after the arrays, so an interrupted run leaves no entry that looks complete.
An entry that cannot be read back whole (a truncated or garbled ``stats.npz``, a manifest that is
not JSON, arrays of the wrong shape or type) is a miss: a warning names it, and the statistics are
recomputed and written over it.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gencli.io import atomic_write, write_json
from gencli.metrics.domain import key_hash
from gencli.metrics.timing import timed
from gencli.progress import track_batches

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: What a truncated or garbled entry raises while being read (KeyError: an array is missing).
UNREADABLE_ENTRY = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error)


class CorruptEntry(ValueError):
    """A cache entry whose files parse but do not hold what gencli wrote."""


@dataclass
class ReferenceStats:
    n: int
    feature_sum: np.ndarray  # (D,) float64
    outer_sum: np.ndarray  # (D, D) float64
    features: torch.Tensor  # (n, D) float32 bank for KID / PRDC
    key: dict[str, Any]
    cache: str  # "hit" | "miss" | "off"
    path: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the class labels of the n images (set by the sample pass when a metric needs them)
    labels: torch.Tensor | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.feature_sum / self.n

    @property
    def cov(self) -> np.ndarray:
        mean = self.mean
        return (self.outer_sum - self.n * np.outer(mean, mean)) / (self.n - 1)

    def describe(self) -> dict[str, Any]:
        where = {k: self.key[k] for k in ("data", "split", "files") if k in self.key}
        return {**where, "n_real": self.n, "n_requested": self.key["n"], "cache": self.cache, "cache_entry": self.path,
                "seconds": round(self.seconds, 3)}

    def where(self) -> str:
        """A few words for the results table: which real images."""
        if "files" in self.key:
            return f"{self.n} real from ref={self.key['files']['path']}"
        return f"{self.n} real ({self.key['data'].get('name')} {self.key['split']})"


class SplitImages:
    """The real images of one split of a data module (already in a seeded random order): the first n are used."""

    def __init__(self, datamodule, split: str):
        self.datamodule, self.split = datamodule, split
        self.name = f"{datamodule.name}-{split}"
        self.image_shape = tuple(datamodule.image_shape)

    def key(self) -> dict[str, Any]:
        return {"data": self.datamodule.describe(), "split": self.split}

    def count(self, n: int | None) -> int:
        with timed("io"):  # the first look at a split reads the data set
            available = len(self.datamodule.split(self.split).images)
        total = available if not n or n <= 0 else min(int(n), available)
        if total < 2:
            from gencli.errors import ConfigError

            raise ConfigError(f"split={self.split} of data={self.datamodule.name} has {available} image(s); reference "
                              "statistics need at least 2.")
        return total

    def batches(self, total: int, batch_size: int):
        with timed("io"):
            images = self.datamodule.split(self.split).images
        start = 0
        for b in track_batches(total, batch_size, f"reference features ({self.datamodule.name} {self.split})"):
            with timed("io"):
                batch = images[start : start + b].float() / 127.5 - 1
            yield batch
            start += b

    def labels(self, total: int) -> torch.Tensor | None:
        labels = self.datamodule.split(self.split).labels
        return None if labels is None else torch.as_tensor(labels[:total])


class FileImages:
    """``ref=``: real images from a folder (PNG/JPEG, searched recursively, sorted by path) or an .npz/.npy of uint8
    images, read with the same rules as ``samples=`` (:class:`gencli.metrics.sources.FileSource`). The cache key holds
    a sha256 of every file's bytes, so a changed, added or removed image never reuses stale statistics."""

    name = "files"

    def __init__(self, path: str, image_shape: tuple[int, int, int] | None = None, data_name: str = "data"):
        from gencli.metrics.sources import FileSource

        self.image_shape = tuple(image_shape) if image_shape is not None else FileSource.peek_shape(path, key="ref")
        self.source = FileSource(path, self.image_shape, n=0, key="ref", data_name=(
            "the first image of ref=" + str(path) if image_shape is None else data_name))
        self.path = self.source.path
        self._sha256: str | None = None

    def content_sha256(self) -> str:
        if self._sha256 is None:
            with timed("io"):  # every file's bytes
                self._sha256 = self.files_sha256()
        return self._sha256

    def files_sha256(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        files = self.source.files if self.source.files is not None else [self.path]
        for file in files:
            digest.update(str(Path(file).relative_to(self.path) if file != self.path else file.name).encode())
            digest.update(hashlib.sha256(Path(file).read_bytes()).digest())
        return digest.hexdigest()

    def key(self) -> dict[str, Any]:
        return {"files": {"path": str(self.path), "sha256": self.content_sha256(), "images": self.source.available,
                          "image_shape": list(self.image_shape), "channels": self.source.conversion}}

    def describe(self) -> dict[str, Any]:
        """What the domain extractor and provenance see in place of a data module's describe()."""
        return {"name": self.name, **self.key()["files"]}

    def classes(self) -> None:
        return None

    def count(self, n: int | None) -> int:
        available = self.source.available
        return available if not n or n <= 0 else min(int(n), available)

    def batches(self, total: int, batch_size: int):
        self.source.n = total
        stream = self.source.stream(batch_size)  # the same batch sizes as the bar's
        for _ in track_batches(total, batch_size, f"reference features (ref={self.path})"):
            yield next(stream)[0]

    def labels(self, total: int) -> torch.Tensor | None:
        return self.source.labels_for(0, total)


def reference_key(images, extractor, n: int | None) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, **images.key(), "extractor": extractor.identity(),
            "n": "all" if not n or n <= 0 else int(n)}


def entry_dir(cache_dir: str | Path, images, extractor, key: dict) -> Path:
    return Path(str(cache_dir)).expanduser() / "reference" / f"{images.name}-{extractor.name}-{key_hash(key)}"


@torch.no_grad()
def compute_reference(images, extractor, n: int | None, batch_size: int) -> tuple[int, np.ndarray, np.ndarray, torch.Tensor]:
    """One pass over the first ``n`` real images."""
    total = images.count(n)
    feature_sum = outer_sum = None
    bank = []
    for x in images.batches(total, batch_size):
        with timed("features"):
            feats = extractor.features(x)
        f64 = feats.double()
        feature_sum = f64.sum(0) if feature_sum is None else feature_sum + f64.sum(0)
        outer_sum = f64.T @ f64 if outer_sum is None else outer_sum + f64.T @ f64
        bank.append(feats.float())
    return total, feature_sum.numpy(), outer_sum.numpy(), torch.cat(bank)


def read_entry(entry: Path, plain_key: dict, feature_dim: int = 0) -> ReferenceStats | None:
    """The statistics stored in ``entry``, or None when it belongs to another key.

    Everything is checked before it is trusted: a silently wrong FID is worse than a recomputation.
    Raises one of :data:`UNREADABLE_ENTRY` when the files are damaged.
    """
    manifest = json.loads((entry / "manifest.json").read_text())
    if not isinstance(manifest, dict):
        raise CorruptEntry(f"manifest.json holds a {type(manifest).__name__}, not an object")
    if manifest.get("key") != plain_key:
        return None
    with np.load(entry / "stats.npz") as stats:  # allow_pickle stays off: only plain arrays load
        n, feature_sum, outer_sum, features = (stats[name] for name in ("n", "feature_sum", "outer_sum", "features"))
    if n.shape != () or n.dtype.kind not in "iu" or int(n) < 2:
        raise CorruptEntry(f"n is {n!r}, not a count of at least 2 images")
    n, d = int(n), features.shape[-1] if features.ndim == 2 else -1
    expected = {"feature_sum": (feature_sum, (d,), np.float64), "outer_sum": (outer_sum, (d, d), np.float64),
                "features": (features, (n, d), np.float32)}
    for name, (array, shape, dtype) in expected.items():
        if array.shape != shape or array.dtype != dtype:
            raise CorruptEntry(f"{name} has shape {array.shape} and type {array.dtype}, expected {shape} {np.dtype(dtype)}")
    if manifest.get("feature_dim") != d or manifest.get("n_real") != n or (feature_dim and feature_dim != d):
        raise CorruptEntry(f"the arrays hold {n} x {d} features but the manifest says {manifest.get('n_real')} x "
                           f"{manifest.get('feature_dim')}")
    if not (np.isfinite(feature_sum).all() and np.isfinite(outer_sum).all() and np.isfinite(features).all()):
        raise CorruptEntry("the arrays hold non-finite values")
    return ReferenceStats(n=n, feature_sum=feature_sum, outer_sum=outer_sum, features=torch.from_numpy(features),
                          key=plain_key, cache="hit", path=str(entry))


def load_or_compute(datamodule, split: str, extractor, n: int | None, cache_dir: str | Path | None,
                    batch_size: int = 256, use_cache: bool = True) -> ReferenceStats:
    """Reference statistics of a data split from the cache, or computed (and stored when ``use_cache``)."""
    return load_or_compute_images(SplitImages(datamodule, split), extractor, n, cache_dir, batch_size, use_cache)


def load_or_compute_images(images, extractor, n: int | None, cache_dir: str | Path | None, batch_size: int = 256,
                           use_cache: bool = True) -> ReferenceStats:
    """Reference statistics of ``images`` (:class:`SplitImages` or :class:`FileImages`), cached or computed."""
    key = reference_key(images, extractor, n)
    plain_key = json.loads(json.dumps(key, default=str))
    entry = entry_dir(cache_dir, images, extractor, key) if cache_dir else None
    start = time.perf_counter()
    if use_cache and entry is not None and (entry / "manifest.json").is_file() and (entry / "stats.npz").is_file():
        try:
            with timed("io"):
                ref = read_entry(entry, plain_key, getattr(extractor, "feature_dim", 0))
        except UNREADABLE_ENTRY as err:
            log.warning("reference statistics cache entry %s is truncated or corrupt (%s: %s); recomputing it and "
                        "overwriting the entry", entry, type(err).__name__, err)
            ref = None
        if ref is not None:
            ref.seconds = time.perf_counter() - start
            log.info("reference statistics: cache hit (%s)", entry)
            return ref
    total, feature_sum, outer_sum, bank = compute_reference(images, extractor, n, batch_size)
    seconds = time.perf_counter() - start
    if use_cache and entry is not None:
        from gencli.provenance import environment

        with timed("io"), atomic_write(entry / "stats.npz") as f:
            np.savez(f, n=np.int64(total), feature_sum=feature_sum, outer_sum=outer_sum, features=bank.numpy())
        with timed("io"):
            write_json(entry / "manifest.json", {"key": plain_key, "n_real": total, "feature_dim": int(bank.shape[1]),
                                                 "compute_seconds": round(seconds, 3), **environment()})
        log.info("reference statistics: computed %d %s images in %.1f s, cached in %s", total, images.name, seconds, entry)
    return ReferenceStats(n=total, feature_sum=feature_sum, outer_sum=outer_sum, features=bank, key=plain_key,
                          cache="miss" if use_cache and entry is not None else "off",
                          path=str(entry) if entry else None, seconds=seconds)
