"""Small image classifiers whose penultimate layer is gencli's "domain" feature space.

``gencli eval features=domain`` and the in-training ``SampleQuality`` callback measure FID, KID,
precision/recall and density/coverage on these features, and an IS-style score on their logits.
They are plain ``nn.Module``s (no training logic):

- :class:`LeNet` for 1-channel data: two conv + max-pool stages and a 128-unit fully connected
  layer, in the spirit of LeCun et al. 1998; about 1.9 M multiply-adds per 32x32 image, so it trains
  on 9k MNIST images in about a minute on 2 CPU cores and extracts thousands of images per second.
- :class:`SmallResNet` for RGB data: a 3x3 stem and one pre-activation-free basic residual block per
  stage (He et al. 2016) at widths w, 2w, 4w, then global average pooling.
- :class:`ClassifierNet` picks one of them (``arch: auto`` = LeNet for 1 channel, SmallResNet for 3).

Every net has ``features(x) -> (N, feature_dim)`` (post-ReLU, like Inception's pool3) and
``head(features) -> logits``; ``forward(x)`` is ``head(features(x))``. Inputs are [-1, 1] NCHW.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError

ARCHS = ("auto", "lenet", "resnet")


def check_size(image_size: int, what: str) -> None:
    if image_size < 8 or image_size % 4:
        raise ConfigError(f"{what}: image size {image_size} is not supported; use a multiple of 4 from 8 up (e.g. 16, 32).")


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 32, num_classes: int = 10, feature_dim: int = 128,
                 width: int = 16):
        super().__init__()
        check_size(image_size, "LeNet")
        self.feature_dim = int(feature_dim)
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 32):
        super().__init__()
        check_size(image_size, "SmallResNet")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2),
                                    BasicBlock(2 * width, 4 * width, stride=2))
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ClassifierNet(nn.Module):
    """LeNet or SmallResNet by ``arch`` (``auto``: LeNet for 1 channel, SmallResNet for RGB)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int = 10, arch: str = "auto",
                 width: int | None = None, feature_dim: int = 128):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"classifier arch={arch!r} is not known; use one of {', '.join(ARCHS)}.")
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes (num_classes={num_classes}).")
        self.arch = ("lenet" if in_channels == 1 else "resnet") if arch == "auto" else arch
        if self.arch == "lenet":
            self.net = LeNet(in_channels, image_size, num_classes, feature_dim=feature_dim, width=width or 16)
        else:
            self.net = SmallResNet(in_channels, image_size, num_classes, width=width or 32)
        self.feature_dim = self.net.feature_dim
        self.num_classes = int(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)

    def head(self, features: Tensor) -> Tensor:
        return self.net.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
