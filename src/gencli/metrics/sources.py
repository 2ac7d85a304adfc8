"""Where the images being evaluated come from: a model's sampler, or files made anywhere.

Both sources stream [-1, 1] float NCHW batches quantised to uint8 levels, exactly what the images
would be once saved as PNG or npz. So ``gencli eval ckpt=...`` and ``gencli eval samples=...`` of the
same images (``gencli sample`` with the same seed, at any batch size) give the same numbers.

- :class:`ModelSource`: ``model.sample(b, generator=..., **sample_options)`` batch after batch, image i's
  noise from its own generator seeded by (seed, i) (``gencli.seeds``), never holding more than one batch.
- :class:`FileSource`: ``samples=file.npz`` (uint8 NHWC or NHW under the key ``images``, as
  ``gencli sample`` and torch-fidelity write), ``samples=file.npy``, or ``samples=DIR`` of PNG/JPEG
  files (searched recursively, sorted by path, decoded one batch at a time).

Images must have the reference data's height and width: a mismatch is a ConfigError that says how
to fix it (``data.image_size=``); nothing is silently resized. Grayscale files are replicated to RGB
for an RGB reference, and RGB files whose three channels are equal are read as grayscale for a
grayscale reference; both are recorded. Colour images against a grayscale reference are refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gencli.errors import ConfigError
from gencli.io import from_uint8, to_uint8
from gencli.metrics.timing import timed
from gencli.progress import batch_sizes

log = logging.getLogger(__name__)


def show_first(values: np.ndarray, count: int = 3) -> str:
    shown = ", ".join(str(v) for v in values.ravel()[:count].tolist())
    return shown + (", ..." if values.size > count else "")


def quantise(images: Tensor) -> tuple[Tensor, np.ndarray]:
    """[-1, 1] float NCHW -> (the same images at uint8 levels as float NCHW, uint8 NHWC)."""
    u8 = to_uint8(images)
    return from_uint8(u8), u8


class ImageSource:
    n: int = 0

    def stream(self, batch_size: int) -> Iterator[tuple[Tensor, np.ndarray]]:
        """Yield (float [-1, 1] NCHW batch, uint8 NHWC batch) in ``batch_sizes(n, batch_size)`` pieces."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def labels_for(self, start: int, count: int) -> Tensor | None:
        """The class labels of images ``start .. start + count - 1`` (conditional samples), or None."""
        return None


class ModelSource(ImageSource):
    def __init__(self, model, n: int, seed: int, options: dict | None = None, ckpt: str | None = None,
                 labels=None, hardware: dict | None = None):
        if n < 2:
            raise ConfigError(f"n={n}: sample-based metrics need at least 2 generated images (e.g. n=1000).")
        self.model, self.n, self.seed, self.options, self.ckpt = model, int(n), int(seed), dict(options or {}), ckpt
        if labels is None and getattr(model, "conditional", False):
            from gencli.labels import plan_labels

            labels = plan_labels(None, model)  # class-balanced: image i is class i % K
        #: a conditional model's LabelPlan: image i is drawn as class labels.label_of(i)
        self.labels = labels
        #: wall time spent in model.sample alone (the sampling cost, apart from feature extraction)
        self.sampling_seconds = 0.0
        self.images_sampled = 0
        #: what hardware= applied to sampling (gencli.sampling_hardware), for the provenance; None: nothing
        self.hardware = hardware

    @torch.no_grad()
    def stream(self, batch_size: int) -> Iterator[tuple[Tensor, np.ndarray]]:
        """Images 0..n-1 of ``seed``, each from its own generator (gencli.seeds): the same images, in the same
        order, as ``gencli sample seed=...`` writes, whatever either's batch size."""
        from gencli.seeds import batches

        for _, generator in batches(self.seed, self.n, batch_size):
            yield quantise(self.generate(generator))

    def generate(self, generator) -> Tensor:
        """model.sample for the generator's images, timed (synchronised on a GPU, so the time is the work's)."""
        start = time.perf_counter()
        labels = {}
        if self.labels is not None:
            labels["labels"] = self.labels.labels_of(generator.indices, self.model.device)
        with timed("generation", images=len(generator)):
            images = self.model.sample(len(generator), generator=generator, **labels, **self.options)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
        self.sampling_seconds += time.perf_counter() - start
        self.images_sampled += len(images)
        return images

    def cost(self) -> dict[str, Any]:
        """Seconds per generated image (model.sample alone) over this process's images."""
        nfe = self.model.sampling_info(**self.options).get("nfe")  # network evaluations per image (diffusion)
        return {"nfe": nfe, "images": self.images_sampled, "seconds": round(self.sampling_seconds, 3),
                "seconds_per_image": self.sampling_seconds / max(self.images_sampled, 1)}

    def cost_note(self) -> str:
        cost = self.cost()
        nfe = f"{cost['nfe']} network evaluations and " if cost.get("nfe") else ""
        return f"sampling cost: {nfe}{cost['seconds_per_image']:.4g} s per image ({cost['images']} images)"

    def labels_for(self, start: int, count: int) -> Tensor | None:
        return self.labels.labels_for(start, count) if self.labels is not None else None

    def describe(self) -> dict[str, Any]:
        from gencli.seeds import SEED_RULE

        return {"source": "ckpt", "ckpt": self.ckpt, "n_generated": self.n, "seed": self.seed, "seeding": SEED_RULE,
                "sampling": {**self.model.sampling_info(**self.options),
                             **({"hardware": self.hardware} if self.hardware is not None else {})},
                **({"labels": self.labels.describe()} if self.labels is not None else {}),
                "quantisation": "samples rounded to uint8 levels, as when saved"}


class FileSource(ImageSource):
    def __init__(self, path: str, image_shape: tuple[int, int, int], n: int = 0, data_name: str = "data",
                 key: str = "samples", minimum: int = 2):
        #: the option the user gave the path with (samples=, input=), named in every error
        self.key = key
        self.path = Path(str(path)).expanduser()
        self.channels, self.height, self.width = (int(s) for s in image_shape)
        self.data_name = data_name
        self.conversion = "none"
        if not self.path.exists():
            raise ConfigError(f"{key}={path} does not exist. Give an .npz/.npy of uint8 images (N, H, W[, C]) such as "
                              "'gencli sample' writes (samples.npz), or a folder of PNG/JPEG images.")
        if self.path.is_dir():
            from gencli.data.folder import list_images

            self.files = list_images(self.path)
            if not self.files:
                raise ConfigError(f"{key}={path} is a folder without images (PNG, JPEG, ... searched recursively).")
            self.array, self.labels = None, None
            available = len(self.files)
            first = self.decode(self.files[0])
            self.check_shape(first[None])
        else:
            self.files = None
            self.array, self.labels = self.load_array()
            available = len(self.array)
            self.check_shape(self.array[:1])
        self.available = available
        self.n = available if n <= 0 else min(int(n), available)
        if self.n < minimum:
            raise ConfigError(f"{key}={path} holds {available} image(s); sample-based metrics need at least {minimum}.")
        if self.n < available:
            log.warning("samples=%s holds %d images; using the first n=%d (n=0 uses all)", path, available, self.n)

    @staticmethod
    def peek_shape(path: str, key: str = "ref") -> tuple[int, int, int]:
        """(C, H, W) of the first image of a folder / the images of an array file, to compare others against it."""
        probe = FileSource.__new__(FileSource)
        probe.key, probe.path = key, Path(str(path)).expanduser()
        if not probe.path.exists():
            raise ConfigError(f"{key}={path} does not exist. Give a folder of PNG/JPEG images or an .npz/.npy of uint8 "
                              "images (N, H, W[, C]).")
        if probe.path.is_dir():
            from gencli.data.folder import list_images

            files = list_images(probe.path)
            if not files:
                raise ConfigError(f"{key}={path} is a folder without images (PNG, JPEG, ... searched recursively).")
            h, w, c = probe.decode(files[0]).shape
        else:
            _, h, w, c = probe.load_array()[0].shape
        return c, h, w

    def load_array(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The images, and the class labels an .npz holds beside them (key ``labels``, as gencli sample writes for a
        conditional model), or None."""
        suffix = self.path.suffix.lower()
        labels = None
        try:
            if suffix == ".npy":
                array = np.load(self.path, mmap_mode="r")
            elif suffix == ".npz":
                with np.load(self.path) as archive:
                    if "images" not in archive.files:
                        raise ConfigError(f"{self.key}={self.path} has no array named 'images' (it has {', '.join(archive.files)}); "
                                          "gencli reads uint8 images (N, H, W[, C]) under the key 'images'.")
                    array = archive["images"]
                    if "labels" in archive.files:
                        labels = archive["labels"]
            else:
                raise ConfigError(f"{self.key}={self.path} is neither an .npz, an .npy nor a folder of images.")
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.key}={self.path} could not be read as a numpy archive ({err}).") from err
        if array.dtype != np.uint8:
            raise ConfigError(f"{self.key}={self.path} holds {array.dtype} images; gencli reads uint8 images (0..255), "
                              "N x H x W [x C], as 'gencli sample' writes them.")
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ConfigError(f"{self.key}={self.path} holds an array of shape {array.shape}; expected N x H x W x C "
                              "(channels last, C = 1 or 3) or N x H x W.")
        if labels is not None:
            self.check_label_array(labels, len(array))
        return array, labels

    def check_label_array(self, labels: np.ndarray, images: int) -> None:
        """The ``labels`` array of an .npz: one integer per image. Their range is checked by :meth:`check_labels` where
        they are used and the classes are known (the class metrics of gencli eval)."""
        fix = ("expected one integer class per image (class indices under 'labels', as 'gencli sample' of a "
               "conditional checkpoint writes them), or no 'labels' array to evaluate without class metrics.")
        where = f"{self.key}={self.path}"
        if labels.ndim != 1:
            raise ConfigError(f"{where} holds 'labels' of shape {labels.shape}, not a 1-d array of {images}; {fix}")
        if labels.dtype.kind not in "iu":
            raise ConfigError(f"{where} holds 'labels' of type {labels.dtype} (e.g. {show_first(labels)}), not "
                              f"integers; {fix}")
        if len(labels) != images:
            raise ConfigError(f"{where} holds {len(labels)} labels beside {images} images; {fix}")

    def check_labels(self, num_classes: int | None, whose: str, labels: np.ndarray | None = None) -> None:
        """Refuse class labels outside ``0 .. num_classes - 1`` (``whose`` names where the classes come from), or
        negative ones when the number of classes is not known: one paragraph naming the file, the first bad label,
        its index and the valid range. A label no class has would count as a wrong answer (class accuracy) or a class
        without real images (intra-FID), silently."""
        labels = getattr(self, "labels", None) if labels is None else labels
        if labels is None:
            return
        labels = np.asarray(labels)
        bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= int(num_classes))
        if not bad.any():
            return
        index = int(np.argmax(bad))
        count = int(bad.sum())
        others = f" ({count - 1} more label(s) are out of range too)" if count > 1 else ""
        valid = (f"0..{int(num_classes) - 1}, the {int(num_classes)} classes of {whose}" if num_classes is not None
                 else "class indices 0, 1, 2, ... (never negative)")
        what = {"ref": "the real images' classes", "input": "the class of each input image"}.get(
            self.key, "the class each image was generated as")
        raise ConfigError(
            f"{self.key}={self.path} holds the class label {labels[index].item()} at index {index} (image {index})"
            f"{others}; its 'labels' array gives {what} and must hold {valid}. Fix or regenerate the file (gencli "
            "sample of a conditional checkpoint writes valid labels), or remove its 'labels' array to evaluate "
            "without class metrics.")

    def labels_for(self, start: int, count: int) -> Tensor | None:
        if self.labels is None:
            return None
        return torch.from_numpy(np.asarray(self.labels[start: start + count], dtype=np.int64))

    def decode(self, path: Path) -> np.ndarray:
        """One file as uint8 HxWxC with the channels it holds (check_shape decides what fits)."""
        from gencli.data.folder import UnreadableImage, read_image_uint8

        try:
            return read_image_uint8(path)
        except UnreadableImage as err:
            raise ConfigError(f"{self.key}={self.path}: {err}. Replace or remove that file.") from err

    def check_shape(self, batch: np.ndarray) -> None:
        _, h, w, c = batch.shape
        files_vs_files = self.data_name.startswith(("ref=", "the first image of "))
        if (h, w) != (self.height, self.width) and files_vs_files:
            raise ConfigError(
                f"{self.key}={self.path} holds {h}x{w} images but {self.data_name} holds {self.height}x{self.width} "
                "images. Nothing is resized silently: both image sets must have the same size (resize one of them "
                "the way you want it measured, e.g. with PIL's Image.resize, and save it again).")
        if (h, w) != (self.height, self.width):
            raise ConfigError(
                f"{self.key}={self.path} holds {h}x{w} images but data={self.data_name} (the reference) gives "
                f"{self.height}x{self.width}. Nothing is resized silently: add data.image_size={h} to compare with "
                f"the real images at {h}x{w}, or save your samples at {self.height}x{self.width}."
            )
        if c == self.channels:
            return
        if c == 1 and self.channels == 3:
            self.conversion = "grayscale samples replicated to 3 channels"
            return
        if c == 3 and self.channels == 1 and np.array_equal(batch[..., 0], batch[..., 1]) and np.array_equal(batch[..., 0], batch[..., 2]):
            self.conversion = "RGB samples with equal channels read as grayscale"
            return
        if files_vs_files:
            raise ConfigError(f"{self.key}={self.path} holds {c}-channel images but {self.data_name} holds "
                              f"{self.channels}-channel ones; convert one set so both are RGB or both grayscale.")
        raise ConfigError(
            f"{self.key}={self.path} holds {c}-channel images but data={self.data_name} has {self.channels} channel(s); "
            f"add data.channels={c} to compare with the real images in {'RGB' if c == 3 else 'grayscale'}."
        )

    def fit_channels(self, batch: np.ndarray) -> np.ndarray:
        self.check_shape(batch)
        if batch.shape[-1] == self.channels:
            return batch
        if self.channels == 3:
            return np.repeat(batch, 3, axis=-1)
        return batch[..., :1]

    def stream(self, batch_size: int) -> Iterator[tuple[Tensor, np.ndarray]]:
        start = 0
        for b in batch_sizes(self.n, batch_size):
            with timed("io"):
                if self.files is not None:  # one file at a time: every file is checked (sizes, channels)
                    batch = np.concatenate([self.fit_channels(self.decode(p)[None]) for p in self.files[start : start + b]])
                else:
                    batch = self.fit_channels(np.array(self.array[start : start + b]))  # a copy: .npy files are memory-mapped read-only
                images = from_uint8(batch)
            start += b
            yield images, batch

    def describe(self) -> dict[str, Any]:
        return {"source": "samples", "samples": str(self.path), "n_generated": self.n, "n_available": self.available,
                "channels": self.conversion, "sampling": "unknown (images made outside this run)"}
