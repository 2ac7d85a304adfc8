"""Convolutional encoder and decoder for any power-of-two image size from 8 to 64.

The encoder halves the resolution with stride-2 convolutions until it reaches ``bottom_size``
(4x4 by default), doubling the channels at each stage up to ``max_channels``; the decoder mirrors
it with transposed convolutions. So a 16x16 input gets two stages and a 64x64 input four, with the
same config.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gencli.errors import ConfigError

SUPPORTED_SIZES = (8, 16, 32, 64)


def check_image_size(image_size: int, bottom_size: int = 4) -> int:
    """Return the number of stride-2 stages from ``image_size`` down to ``bottom_size``."""
    if image_size < bottom_size * 2 or image_size & (image_size - 1):
        raise ConfigError(
            f"image size {image_size} is not supported by the conv nets: they need a power of two "
            f"from {bottom_size * 2} up (8, 16, 32 or 64 are tested). Set data.image_size to one of these."
        )
    return int(math.log2(image_size // bottom_size))


def stage_channels(n_stages: int, base_channels: int, max_channels: int) -> list[int]:
    return [min(base_channels * 2**i, max_channels) for i in range(n_stages)]


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm={kind!r} is not a known normalisation; use batch, group or none.")


class ConvEncoder(nn.Module):
    """Image (N, C, H, W) -> vector (N, out_features)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        out_features: int,
        base_channels: int = 32,
        max_channels: int = 256,
        bottom_size: int = 4,
        norm: str = "batch",
    ):
        super().__init__()
        n_stages = check_image_size(image_size, bottom_size)
        channels = stage_channels(n_stages, base_channels, max_channels)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU()]
        prev = channels[0]
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), norm_layer(norm, ch), nn.SiLU()]
            prev = ch
        self.features = nn.Sequential(*layers)
        self.out_features = out_features
        self.head = nn.Linear(prev * bottom_size * bottom_size, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """Vector (N, in_features) -> image (N, C, H, W), unbounded (the family picks the output map)."""

    def __init__(
        self,
        in_features: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 32,
        max_channels: int = 256,
        bottom_size: int = 4,
        norm: str = "batch",
    ):
        super().__init__()
        n_stages = check_image_size(image_size, bottom_size)
        channels = stage_channels(n_stages, base_channels, max_channels)[::-1]
        self.bottom = (channels[0], bottom_size, bottom_size)
        self.head = nn.Linear(in_features, channels[0] * bottom_size * bottom_size)
        layers: list[nn.Module] = [nn.SiLU()]
        prev = channels[0]
        for ch in channels[1:] + [channels[-1]]:
            layers += [nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1), norm_layer(norm, ch), nn.SiLU()]
            prev = ch
        layers.append(nn.Conv2d(prev, out_channels, 3, padding=1))
        self.features = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.features(self.head(z).view(-1, *self.bottom))
