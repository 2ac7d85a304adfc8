"""Feature extractors for the sample metrics (``features=`` in ``gencli eval``).

A :class:`FeatureExtractor` maps images ([-1, 1], NCHW, the data set's shape) to features (N, D) and,
when it has a classifier head, logits (N, K). FID/KID/PRDC use the features, IS the logits. Two are
provided:

- :class:`InceptionFeatures` (``features=inception``): the FID InceptionV3 of torch-fidelity (the
  network torchmetrics' FID/KID/IS use) with the standard ``weights-inception-2015-12-05-6726825d.pth``,
  pool3 features (2048) and the unbiased logits for IS, images quantised to uint8, grayscale
  replicated to RGB, and resized to 299x299 with torch-fidelity's TensorFlow-1.x-compatible bilinear
  interpolation (what the original TF FID code does). One instance serves FID, KID and IS, so all
  three use the same weights file. Numbers are comparable with papers.
- :class:`DomainFeatures` (``features=domain``): gencli's own small classifier trained on the data
  set's labels (see :mod:`gencli.metrics.domain`), offline and fast on a CPU. Its numbers are only
  comparable with other numbers from the same classifier, never with Inception FID.

Weights files are looked up before anything can download: an explicit path, else the torch hub
cache (``$TORCH_HOME/hub/checkpoints``, where torch-fidelity and torchmetrics look too). A missing
file is downloaded only when the host answers within a fraction of a second; offline, the error
names the file, where it should be, the URL and the option that points at it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from gencli.errors import ConfigError, RuntimeFailure
from gencli.metrics.domain import DomainClassifierCache, file_sha256
from gencli.safety import resolve_target

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


# ----------------------------------------------------------------------------- weights files
def hub_checkpoint(filename: str) -> Path:
    """Where torch.hub (and so torch-fidelity, torchmetrics, torchvision) keeps a downloaded file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def online(url: str, timeout: float = 0.7) -> bool:
    """True when ``url``'s host accepts a TCP connection within ``timeout`` seconds (DNS included).

    The probe runs in a daemon thread, so a resolver that hangs cannot hold the caller longer than
    ``timeout``. ``GENCLI_OFFLINE=1`` answers False without probing.
    """
    if os.environ.get("GENCLI_OFFLINE") == "1":
        return False
    host = urlparse(url).hostname or url
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def locate_weights(what: str, filename: str, url: str, explicit: str | None, option: str,
                   download: bool = True) -> Path:
    """The weights file for ``what``: ``explicit``, else the hub cache, else a download when online."""
    if explicit:
        path = Path(str(explicit)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{option}={explicit} does not exist. {what} needs {filename} (download it from {url}); give its "
                f"path, or drop {option} to use the torch hub cache ({hub_checkpoint(filename)})."
            )
        return path
    path = hub_checkpoint(filename)
    if path.is_file():
        return path
    if download and online(url):
        log.info("downloading %s to %s", url, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path
        except Exception as err:  # connection reset, HTTP errors: same advice as offline
            reason = f"the download from {url} failed ({type(err).__name__}: {str(err)[:120]})"
    else:
        reason = "this machine is offline, so it cannot be downloaded" if download else "downloads are off"
    raise RuntimeFailure(
        f"{what} needs the weights file {filename}, which is not at {path} (the torch hub cache, "
        f"$TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}), and {reason}. "
        f"Download it on a machine with internet from {url}, then copy it to {path} or pass "
        f"{option}=/path/to/{filename}."
    )


# ----------------------------------------------------------------------------- the interface
class FeatureExtractor:
    """Images -> features (and logits). Call :meth:`prepare` once before :meth:`extract`."""

    name = "features"
    #: True only for the standard extractor whose numbers papers report.
    comparable_with_papers = False
    #: Features dimension, known after prepare().
    feature_dim: int = 0

    def prepare(self, datamodule, device: torch.device) -> None:
        raise NotImplementedError

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """[-1, 1] NCHW images -> (features (N, D) float32 on CPU, logits (N, K) float32 on CPU or None)."""
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        return self.extract(images)[0]

    def num_classes(self) -> int | None:
        """The classes of the data set the extractor's logits are (the domain classifier's, once prepared), or None
        when its classes are not the data's (Inception's ImageNet classes)."""
        return None

    def logits(self, images: Tensor) -> Tensor | None:
        return self.extract(images)[1]

    @property
    def transform(self) -> dict[str, Any]:
        """How images are turned into the network's input: part of every reference-cache key."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What makes two feature spaces the same: name, weights sha256 and input transform."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """identity() plus what a reader of metrics.json needs (accuracy, comparability)."""
        return {**self.identity(), "feature_dim": self.feature_dim, "comparable_with_papers": self.comparable_with_papers}

    def summary(self) -> str:
        """A few words for the results table: which features, and how good the extractor is on this data."""
        return self.name

    def caveat(self) -> str | None:
        """What a reader must know beside numbers measured in this feature space, or None."""
        return None


def check_input(images: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    """``images`` as float32 with standard NCHW strides.

    The same pixels must give the same features whatever their memory layout: a 1-channel batch made
    from NHWC files has channels-last strides, and convolutions pick other kernels (other rounding)
    for it, so every batch is copied into the standard layout first.
    """
    if tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(f"features={name} was prepared for images of shape {tuple(shape)} but got "
                          f"{tuple(images.shape[1:])}.")
    return images.float().clone(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- inception
class InceptionFeatures(FeatureExtractor):
    name = "inception"
    comparable_with_papers = True
    feature_dim = 2048

    def __init__(self, weights_path: str | None = None, download: bool = True, batch_size: int = 64):
        self.weights_path = weights_path
        self.download = bool(download)
        self.batch_size = int(batch_size)
        self.net = None
        self.sha256: str | None = None
        self.path: Path | None = None
        self.channels: int | None = None
        self.image_shape: tuple[int, int, int] | None = None
        self.device = torch.device("cpu")

    def prepare(self, datamodule, device: torch.device) -> None:
        self.image_shape = tuple(datamodule.image_shape)
        self.channels = self.image_shape[0]
        self.device = device
        if self.net is not None:
            return
        self.path = locate_weights("features=inception (the FID InceptionV3)", INCEPTION_FILE, INCEPTION_URL,
                                   self.weights_path, "features.weights_path", self.download)
        self.net = self.build(self.path).to(device)
        self.sha256 = file_sha256(self.path)

    @staticmethod
    def build(path: Path) -> torch.nn.Module:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:  # plain tensors only: refuse a file that would run code when unpickled
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeFailure(f"{path} is not a PyTorch state_dict ({type(err).__name__}); replace it with "
                                 f"{INCEPTION_FILE} from {INCEPTION_URL}.") from err
        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        except RuntimeError as err:
            raise RuntimeFailure(f"{path} does not hold the FID InceptionV3 weights ({str(err).splitlines()[0][:160]}); "
                                 f"replace it with {INCEPTION_FILE} from {INCEPTION_URL}.") from err

    @torch.no_grad()
    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        images = check_input(images, self.image_shape, self.name)
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            x = ((chunk.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> 0..255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, lg = self.net(x.to(self.device))
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
        return torch.cat(feats), torch.cat(logits)

    @property
    def transform(self) -> dict[str, Any]:
        return {
            "input": "images quantised to uint8 (0..255)",
            "channels": "grayscale replicated to 3 channels" if self.channels == 1 else "RGB as is",
            "resize": "bilinear to 299x299, TensorFlow-1.x compatible (torch-fidelity "
                      "interpolate_bilinear_2d_like_tensorflow1x, no antialias), then (x - 128) / 128",
            "layers": "pool3 (2048) for FID/KID/PRDC, logits_unbiased (1008) for IS",
        }

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "network": "FID InceptionV3 (torch-fidelity FeatureExtractorInceptionV3)",
                "weights": INCEPTION_FILE, "weights_sha256": self.sha256, "transform": self.transform}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights_path": str(self.path)}

    def summary(self) -> str:
        # its accuracy is ImageNet's (the published 78% top-1), not measurable on unlabelled data here
        return "inception pool3 (FID InceptionV3, ImageNet weights)"


# ----------------------------------------------------------------------------- domain
class DomainFeatures(FeatureExtractor):
    name = "domain"
    comparable_with_papers = False

    def __init__(
        self,
        cache_dir: str,
        ckpt: str | None = None,
        seed: int = 0,
        arch: str = "auto",
        width: int | None = None,
        feature_dim: int = 128,
        epochs: int = 8,
        batch_size: int = 128,
        lr: float = 0.003,
        shift: int = 2,
        train_split: str = "train",
        min_accuracy: float | None = None,
        eval_batch_size: int = 1024,
    ):
        self.ckpt = ckpt
        self.cache = DomainClassifierCache(cache_dir, recipe={
            "seed": int(seed), "arch": arch, "width": width, "feature_dim": int(feature_dim), "epochs": int(epochs),
            "batch_size": int(batch_size), "lr": float(lr), "shift": int(shift),
        }, train_split=train_split)
        #: None: the data set's default (:func:`default_min_accuracy`), set in prepare()
        self.min_accuracy = None if min_accuracy is None else float(min_accuracy)
        self.min_accuracy_source = "features.min_accuracy" if min_accuracy is not None else None
        self.eval_batch_size = int(eval_batch_size)
        self.module = None
        self.info: dict[str, Any] = {}
        self.image_shape: tuple[int, int, int] | None = None
        self.device = torch.device("cpu")
        self._prepared_for: dict | None = None

    def prepare(self, datamodule, device: torch.device) -> None:
        describe = datamodule.describe()
        if self.module is not None and self._prepared_for == describe:
            self.module.to(device)
            self.device = device
            return
        self.image_shape = tuple(datamodule.image_shape)
        self.device = device
        if self.ckpt:
            self.module, self.info = self.from_checkpoint(self.ckpt)
        elif not hasattr(datamodule, "split"):  # ref= files alone: no labelled data to train a classifier on
            raise ConfigError(
                f"features=domain trains a classifier on a labelled data set, and ref={describe.get('path')} is a set "
                "of unlabelled images. Name the data set the images belong to (data=mnist, data=cifar10, data=folder "
                "data.root=DIR_OF_CLASS_FOLDERS...), give a classifier (features.ckpt=PATH from 'gencli train "
                "model=classifier data=...'), or use features=inception (the papers' feature space).")
        else:
            found = self.cache.load(datamodule, device)
            if found is None:
                found = self.cache.train(datamodule, device)
                found[1]["cache"] = "trained now"
            else:
                found[1]["cache"] = "hit"
            self.module, manifest = found
            self.info = {"source": "trained by gencli on first use", "cache_entry": str(self.cache.entry(datamodule)),
                         "cache": manifest["cache"], "weights_sha256": manifest["weights_sha256"],
                         "held_out_accuracy": manifest["held_out_accuracy"], "trained_on": {
                             "data": describe, "split": self.cache.train_split, "n": manifest["n_train"]},
                         "held_out": {"split": "val", "n": manifest["n_held_out"]}, "arch": manifest["arch"],
                         "recipe": self.cache.recipe}
        if tuple(self.module.image_shape) != self.image_shape:
            raise ConfigError(
                f"the domain classifier works on images of shape {tuple(self.module.image_shape)} but data="
                f"{datamodule.name} gives {self.image_shape}; use a classifier trained on this data "
                "(drop features.ckpt to train one on first use)."
            )
        if self.min_accuracy_source != "features.min_accuracy":
            name, classes = datamodule.name, datamodule.classes() if hasattr(datamodule, "classes") else None
            if self.ckpt:  # the data the classifier was trained on decides what it should reach
                name, classes = self.info.get("data_name"), [None] * int(self.module.net.num_classes)
            self.min_accuracy, self.min_accuracy_source = default_min_accuracy(name, len(classes or []))
        acc = self.info.get("held_out_accuracy")
        self.info["min_accuracy"] = {"value": self.min_accuracy, "from": self.min_accuracy_source}
        if acc is None or acc < self.min_accuracy:
            shown = "unknown (the classifier checkpoint does not record it)" if acc is None else f"{acc:.4f}"
            raise RuntimeFailure(
                f"the domain classifier's held-out accuracy is {shown}, below the {self.min_accuracy:g} required "
                f"({self.min_accuracy_source}): features from a classifier that cannot tell the classes apart make "
                "FID/KID/precision/recall meaningless (a weak one calls grey blobs precise). Train it longer or wider "
                "(features.epochs=..., features.width=...; drop features.ckpt to train one on first use), or, knowing "
                "this, set features.min_accuracy=<lower> to accept it."
            )
        self.module.to(device).eval()
        self.feature_dim = self.module.net.feature_dim
        self._prepared_for = describe

    def num_classes(self) -> int | None:
        return int(self.module.net.num_classes) if self.module is not None else None

    def from_checkpoint(self, path: str):
        from gencli.checkpoints import restore_model
        from gencli.families.classifier import Classifier

        module, checkpoint = restore_model(path, key="features.ckpt")
        if not isinstance(module, Classifier):
            raise ConfigError(f"features.ckpt={path} holds a {type(module).__name__}, not a classifier; give a "
                              "checkpoint from 'gencli train model=classifier data=...'.")
        meta = checkpoint["gencli"]
        data = (meta.get("config") or {}).get("data", {})
        try:
            data_name = getattr(resolve_target(str(data.get("_target_")), "features.ckpt data"), "name", None)
        except ConfigError:
            data_name = None
        return module, {"source": "features.ckpt", "ckpt": str(path), "weights_sha256": file_sha256(path),
                        "held_out_accuracy": meta.get("val_acc"), "trained_on": {
                            "data": {k: v for k, v in data.items() if k not in ("batch_size", "num_workers", "pin_memory")},
                            "split": "train"},
                        "held_out": {"split": "val"}, "arch": module.net.arch, "data_name": data_name}

    @torch.no_grad()
    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        images = check_input(images, self.image_shape, self.name)
        feats, logits = [], []
        for chunk in images.split(self.eval_batch_size):
            f = self.module.net.features(chunk.to(self.device))
            feats.append(f.float().cpu())
            logits.append(self.module.net.head(f).float().cpu())
        return torch.cat(feats), torch.cat(logits)

    @property
    def transform(self) -> dict[str, Any]:
        return {"input": "images as the data module serves them ([-1, 1] floats at the data set's size), no resize"}

    def summary(self) -> str:
        acc = self.info.get("held_out_accuracy")
        return f"domain classifier, held-out accuracy {acc:.1%}" if acc is not None else "domain classifier"

    def caveat(self) -> str | None:
        acc = self.info.get("held_out_accuracy")
        return ("numbers marked 'domain' use gencli's own domain classifier"
                + (f" (held-out accuracy {acc:.2%}, at least {self.min_accuracy:g} required)" if acc is not None else "")
                + ": they compare models evaluated with the same classifier only and are NOT comparable with "
                  "Inception FID/KID/IS in papers")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "network": f"gencli domain classifier ({self.info.get('arch')})",
                "weights_sha256": self.info.get("weights_sha256"), "transform": self.transform}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **{k: v for k, v in self.info.items() if k != "weights_sha256"},
                "warning": "domain features: these numbers compare models evaluated with this same classifier only; "
                           "they are NOT comparable with Inception FID/KID/IS reported in papers"}


#: The held-out accuracy a domain classifier must reach by default, per data set: a little under what the default
#: recipe reaches (digits 0.83 at 8x8, MNIST 0.975 at 16x16 and 0.988 at 28x28, Fashion-MNIST ~0.88, CIFAR-10 ~0.70), far
#: above chance (0.10), and far above the 0.447 of an under-trained CIFAR classifier that called grey blobs precise.
MIN_ACCURACY = {"digits": 0.7, "mnist": 0.95, "fashion_mnist": 0.8, "cifar10": 0.6}


def default_min_accuracy(name: str | None, classes: int) -> tuple[float, str]:
    """(minimum held-out accuracy, where it comes from) for data set ``name`` of ``classes`` classes:
    :data:`MIN_ACCURACY`, else half the images right and at least twice chance, i.e. max(0.5, min(2/K, 0.75))."""
    if name in MIN_ACCURACY:
        return MIN_ACCURACY[name], f"the default for data={name}; features.min_accuracy= overrides it"
    classes = max(int(classes), 2)
    value = max(0.5, min(2.0 / classes, 0.75))
    return value, (f"the default for a data set of {classes} classes, max(0.5, twice chance); features.min_accuracy= "
                   "overrides it")
