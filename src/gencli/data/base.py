"""ImageDataModule: the one base class every data set shares.

A subclass only says how to read its images: :meth:`load_images` returns a uint8 tensor (N, C, H, W)
already at ``image_size`` and the integer labels (or -1 where there are none). The base class holds
them in memory (the data sets gencli targets fit easily: CIFAR-10 is 184 MB as uint8), makes the
deterministic train/val split from ``seed``, and serves [-1, 1] float batches, with random
horizontal flips on the training split when ``random_flip`` is on.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gencli.errors import ConfigError

log = logging.getLogger(__name__)


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images -> ([-1, 1] float image, label)."""

    def __init__(self, images: Tensor, labels: Tensor, random_flip: bool = False):
        self.images, self.labels, self.random_flip = images, labels, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i].float() / 127.5 - 1
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def resize_uint8(images: Tensor, size: int, policy: str = "resize") -> Tensor:
    """Resize uint8 NCHW images to ``size`` x ``size`` (bilinear, antialiased) under a crop policy.

    ``resize`` stretches to a square; ``center_crop`` scales the short side to ``size`` then crops the
    centre, keeping the aspect ratio.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    x = images.float()
    if policy == "center_crop" and h != w:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    elif policy in ("resize", "center_crop"):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        raise ConfigError(f"data.resize={policy!r} is not a resize policy; use resize or center_crop.")
    return x.round().clamp(0, 255).to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """Base: subclasses implement :meth:`load_images`; everything else is shared."""

    #: Short name used in cache keys and provenance.
    name: str = "images"

    def __init__(
        self,
        image_size: int,
        channels: int,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        random_flip: bool = False,
        max_images: int | None = None,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1).")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be a positive integer.")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.max_images = max_images
        self.train_set: UInt8ImageDataset | None = None
        self.val_set: UInt8ImageDataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    # ---- subclasses
    def load_images(self) -> tuple[Tensor, Tensor]:
        """Return (uint8 images (N, C, image_size, image_size), int64 labels (N,))."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Identity of the data for provenance and cache keys: everything that changes which images, or
        which pixels, the splits hold (max_images changes both splits; random_flip what a classifier
        trained on the train split sees)."""
        return {"name": self.name, "image_size": self.image_size, "channels": self.channels,
                "val_fraction": self.val_fraction, "seed": self.seed, "max_images": self.max_images,
                "random_flip": self.random_flip}

    # ---- shared
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_images()
        images = to_channels(images, self.channels)
        if self.max_images is not None:
            images, labels = images[: self.max_images], labels[: self.max_images]
        n = len(images)
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 1:
            raise ConfigError(f"data set has only {n} image(s): too few to split into train and val.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = UInt8ImageDataset(images[train_idx], labels[train_idx], self.random_flip)
        self.val_set = UInt8ImageDataset(images[val_idx], labels[val_idx])
        log.info("%s: %d train / %d val images of shape %s", self.name, n - n_val, n_val, self.image_shape)

    def split(self, name: str) -> UInt8ImageDataset:
        self.setup()
        if name not in ("train", "val"):
            raise ConfigError(f"split={name!r} is not a split; use train or val.")
        return self.train_set if name == "train" else self.val_set

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert uint8 NCHW images between grayscale and RGB (ITU-R 601 luma for RGB -> gray)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ConfigError(f"cannot convert {c}-channel images to data.channels={channels}.")
