"""Training and caching the domain classifier (the network behind ``features=domain``).

:func:`train_classifier` is a small, seeded training loop over in-memory uint8 images: no Trainer, so
it can run inside ``gencli eval`` and inside another run's callback without touching that run's
random state (everything happens under ``torch.random.fork_rng``). It uses the same
:class:`~gencli.families.classifier.Classifier` (loss, augmentation) as ``gencli train
model=classifier``.

:class:`DomainClassifierCache` keeps one trained classifier per key (data set ``describe()``, the
split it was trained on, image shape, seed and training recipe) under
``<cache_dir>/domain/<data>-<hash>/``: ``classifier.pt`` (a state_dict and the net's arguments, plain
tensors and data, loadable with ``weights_only=True``) and ``manifest.json`` (the key, the held-out
accuracy, the file's sha256, the training time). The manifest is written last, so an interrupted
training leaves no entry that looks complete. An entry that cannot be read back (a manifest that is
not JSON or lacks a field, a truncated or garbled ``classifier.pt``) is a miss: a warning names it,
and the classifier is trained again and written over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gencli.errors import ConfigError, RuntimeFailure
from gencli.io import atomic_write, write_json
from gencli.progress import track_batches

log = logging.getLogger(__name__)

#: Bump when the training recipe or the nets change in a way that changes the features.
RECIPE_VERSION = 1

#: The manifest fields a cache hit reads, and their types.
MANIFEST_FIELDS = {"weights_sha256": str, "held_out_accuracy": (int, float), "n_train": int, "n_held_out": int,
                   "arch": str}
#: What a truncated or garbled classifier.pt raises in torch.load or when its state_dict is applied
#: (RuntimeError: torch's zip reader and load_state_dict; UnpicklingError: weights_only refusing it).
UNREADABLE_WEIGHTS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
                      AttributeError, zipfile.BadZipFile)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_float(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1


@torch.no_grad()
def accuracy(module, images: Tensor, labels: Tensor, device: torch.device, batch_size: int = 512) -> float:
    module.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size]).to(device)
        correct += int((module(x).argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def train_classifier(
    net_args: dict[str, Any],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    shift: int,
    flip: bool,
    seed: int,
    device: torch.device,
):
    """Train a :class:`Classifier` on uint8 NCHW images; return (module in eval mode, held-out accuracy).

    Adam with a one-cycle learning rate (warm-up then cosine decay to ~0) over ``epochs``; each epoch
    is a seeded permutation cut into full batches.
    """
    from gencli.families.classifier import Classifier
    from gencli.nets.classifier import ClassifierNet

    images, labels = train
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"features.epochs={epochs} and features.batch_size={batch_size} must be positive.")
    batch_size = min(batch_size, len(images))
    steps = len(images) // batch_size
    # A callback may call this inside Lightning's validation loop, i.e. under inference mode: leave it.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        module = Classifier(ClassifierNet(**net_args), image_shape=tuple(images.shape[1:]), shift=shift).to(device)
        module.check_labels(labels)
        module.check_labels(val[1])
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
        module.train()
        batches = track_batches(epochs * steps * batch_size, batch_size, f"domain classifier: {epochs} epochs")
        try:
            for epoch in range(epochs):
                order = torch.randperm(len(images), generator=generator)
                for i in range(steps):
                    next(batches)
                    idx = order[i * batch_size : (i + 1) * batch_size]
                    x = to_float(images[idx])
                    if flip:
                        flips = torch.rand(len(x), generator=generator) < 0.5
                        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
                    loss, _ = module.loss(x.to(device), labels[idx].to(device), generator=generator)
                    if not math.isfinite(float(loss.detach())):
                        raise RuntimeFailure(f"training the domain classifier diverged at epoch {epoch} (loss "
                                             f"{float(loss.detach())}); lower features.lr.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            next(batches, None)  # the last advance
        finally:
            batches.close()  # the progress bar ends even when training fails
        acc = accuracy(module, *val, device=device)
    module.eval()
    return module, acc


class DomainClassifierCache:
    """Find, or train and store, the domain classifier for one data module."""

    def __init__(self, cache_dir: str | Path, recipe: dict[str, Any], train_split: str = "train"):
        self.root = Path(str(cache_dir)).expanduser() / "domain"
        self.recipe = dict(recipe)
        self.train_split = train_split

    def key(self, datamodule) -> dict[str, Any]:
        return {
            "recipe_version": RECIPE_VERSION,
            "data": datamodule.describe(),
            "train_split": self.train_split,
            "held_out_split": "val",
            "image_shape": list(datamodule.image_shape),
            **self.recipe,
        }

    def entry(self, datamodule) -> Path:
        return self.root / f"{datamodule.name}-{key_hash(self.key(datamodule))}"

    def load(self, datamodule, device: torch.device):
        """(module, manifest) from the cache, or None when there is no complete entry."""
        from gencli.families.classifier import Classifier
        from gencli.nets.classifier import ClassifierNet

        entry = self.entry(datamodule)
        manifest_path, weights = entry / "manifest.json", entry / "classifier.pt"
        if not (manifest_path.is_file() and weights.is_file()):
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
            log.warning("domain classifier cache entry %s has an unreadable manifest.json (%s: %s); retraining and "
                        "overwriting the entry", entry, type(err).__name__, err)
            return None
        if not isinstance(manifest, dict):
            log.warning("domain classifier cache entry %s has a manifest.json that is not an object; retraining", entry)
            return None
        if manifest.get("key") != json.loads(json.dumps(self.key(datamodule), default=str)):
            return None
        broken = [name for name, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(name), kind)]
        if broken:
            log.warning("domain classifier cache entry %s has a manifest.json without valid %s; retraining and "
                        "overwriting the entry", entry, ", ".join(broken))
            return None
        if file_sha256(weights) != manifest["weights_sha256"]:
            log.warning("domain classifier cache entry %s is corrupt (sha256 mismatch); retraining", entry)
            return None
        try:
            stored = torch.load(weights, map_location="cpu", weights_only=True)
            module = Classifier(ClassifierNet(**stored["net_args"]), image_shape=stored["image_shape"],
                                shift=stored["shift"])
            module.net.load_state_dict(stored["state_dict"])
        except UNREADABLE_WEIGHTS as err:
            log.warning("domain classifier cache entry %s has an unreadable classifier.pt (%s: %s); retraining and "
                        "overwriting the entry", entry, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            return None
        return module.to(device).eval(), manifest

    def train(self, datamodule, device: torch.device):
        """Train on the data module's train split, measure on its val split, store; (module, manifest)."""
        train_set, val_set = datamodule.split(self.train_split), datamodule.split("val")
        labels = train_set.labels
        if len(labels) == 0 or int(labels.min()) < 0:
            raise ConfigError(
                f"features=domain trains a classifier on the labels of data={datamodule.name}, but its images have "
                "no class labels (data=folder needs one subfolder per class). Use a labelled data set, "
                "features=inception, or features.ckpt=PATH of a classifier trained with 'gencli train model=classifier'."
            )
        num_classes = int(max(int(labels.max()), int(val_set.labels.max())) + 1)
        if num_classes < 2:
            raise ConfigError(f"features=domain needs at least 2 classes; data={datamodule.name} has {num_classes}.")
        c, size, _ = datamodule.image_shape
        net_args = {"in_channels": c, "image_size": size, "num_classes": num_classes, "arch": self.recipe["arch"],
                    "width": self.recipe["width"], "feature_dim": self.recipe["feature_dim"]}
        log.info("training the domain classifier on %s (%d images, %d classes); it is cached in %s",
                 datamodule.name, len(labels), num_classes, self.entry(datamodule))
        start = time.perf_counter()
        module, acc = train_classifier(
            net_args, (train_set.images, labels), (val_set.images, val_set.labels),
            epochs=self.recipe["epochs"], batch_size=self.recipe["batch_size"], lr=self.recipe["lr"],
            shift=self.recipe["shift"], flip=bool(getattr(datamodule, "random_flip", False)),
            seed=self.recipe["seed"], device=device,
        )
        seconds = time.perf_counter() - start
        entry = self.entry(datamodule)
        weights = entry / "classifier.pt"
        with atomic_write(weights) as f:
            torch.save({"state_dict": {k: v.cpu() for k, v in module.net.state_dict().items()}, "net_args": net_args,
                        "image_shape": list(datamodule.image_shape), "shift": self.recipe["shift"]}, f)
        manifest = {
            "key": json.loads(json.dumps(self.key(datamodule), default=str)),
            "weights_sha256": file_sha256(weights),
            "held_out_accuracy": acc,
            "n_train": len(labels),
            "n_held_out": len(val_set),
            "num_classes": num_classes,
            "arch": module.net.arch,
            "feature_dim": module.net.feature_dim,
            "train_seconds": round(seconds, 2),
        }
        write_json(entry / "manifest.json", manifest)
        log.info("domain classifier: held-out accuracy %.4f after %.1f s", acc, seconds)
        return module, manifest
