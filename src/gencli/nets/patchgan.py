"""The N-layer PatchGAN discriminator (Isola et al. 2017, pix2pix) as taming-transformers uses it for its first stages.

As taming-transformers' ``taming/modules/discriminator/model.py`` ``NLayerDiscriminator`` (and latent-diffusion's
``LPIPSWithDiscriminator``, which imports it): 4x4 convs, ``n_layers`` of them with stride 2 (the first without a
norm, then norm + LeakyReLU(0.2), widths ``ndf * min(2**i, 8)``), one more with stride 1 and a norm, and a final
stride-1 4x4 conv to one channel. It scores every overlapping patch: the output is a map of logits, of side
H / 2**n_layers - 2 for an H divisible by 2**n_layers, each seeing a :func:`receptive_field` (70x70 for the default
n_layers = 3) of the input.

``norm``: ``"batch"`` (the default of the reference code; convs before it have no bias) or ``"actnorm"``
(:class:`ActNorm`, per-channel affine initialised from the first training batch, the reference's
``use_actnorm=True``). Weights are initialised as the reference's ``weights_init``: convs N(0, 0.02), BatchNorm
scales N(1, 0.02) and shifts 0. State-dict keys are the reference's (``main.0.weight``, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gencli.errors import ConfigError

NORMS = ("batch", "actnorm")


class ActNorm(nn.Module):
    """y = scale * (x + loc) per channel; on the first forward in training mode, loc and scale are set so that the
    batch's output has zero mean and unit standard deviation per channel (Kingma & Dhariwal 2018, Glow)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1.0 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and int(self.initialized) == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


def receptive_field(n_layers: int) -> int:
    """The side of the input patch one output logit sees: 70 for n_layers 3, 34 for 2, 16 for 1."""
    strides = [2] * n_layers + [1, 1]
    field = 1
    for stride in reversed(strides):  # kernel 4 everywhere
        field = (field - 1) * stride + 4
    return field


def output_size(image_size: int, n_layers: int) -> int:
    """The side of the logit map for an image side ``image_size`` (padding 1 everywhere)."""
    size = image_size
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2  # two stride-1 4x4 convs with padding 1 each lose one


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """Image (N, in_channels, H, W) -> patch logits (N, 1, H', W'), H' = :func:`output_size` (H, n_layers)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch",
                 image_size: int | None = None):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.discriminator.norm={norm!r} is not known; use batch (BatchNorm, the default of "
                              "taming-transformers) or actnorm.")
        if int(n_layers) != n_layers or n_layers < 1 or ndf < 1:
            raise ConfigError(f"model.discriminator: n_layers={n_layers}, ndf={ndf}: need n_layers >= 1 and ndf >= 1 "
                              "(taming-transformers: n_layers=3, ndf=64, a 70x70 receptive field).")
        if image_size is not None and output_size(image_size, n_layers) < 1:
            smallest = next(n for n in range(n_layers, 0, -1) if output_size(image_size, n) >= 1) \
                if output_size(image_size, 1) >= 1 else None
            fix = (f"use model.discriminator.n_layers={smallest}" if smallest
                   else "use larger images")
            raise ConfigError(f"model.discriminator.n_layers={n_layers} is too deep for {image_size}x{image_size} "
                              f"images: its logit map would be empty (side {output_size(image_size, n_layers)}); "
                              f"{fix}.")
        self.n_layers = int(n_layers)
        self.norm = norm
        layer_norm = nn.BatchNorm2d if norm == "batch" else ActNorm
        bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                       layer_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
                   layer_norm(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.n_layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
