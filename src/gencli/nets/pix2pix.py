"""pix2pix's nets (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks").

:class:`UNetGenerator` -- the encoder-decoder with skips of the paper's appendix 6.1.1 (and of the original
Lua code, ``phillipi/pix2pix`` ``defineG_unet``), sized by resolution: an ``image_size`` image is halved
``log2(image_size)`` times down to a 1x1 bottleneck (8 times for the paper's 256x256), so every image size
that is a power of two gets the paper's net, scaled:

- encoder: 4x4 stride-2 convolutions with ``base_channels * min(2**i, 8)`` channels (C64-C128-C256-C512-C512...),
  LeakyReLU(0.2) before each but the first, a norm after each but the first and the innermost;
- decoder: ReLU -> 4x4 stride-2 transposed convolution -> norm, each taking the previous decoder output
  concatenated with the encoder output of the same resolution (the skips: ``cat([skip, up], 1)``, as the
  reference code), dropout 0.5 on the first three decoder layers (the paper's "CD512-CD1024-CD1024"; pix2pix's
  only noise source), Tanh at the end;
- weights N(0, 0.02), norm scales N(1, 0.02), biases 0 (the reference ``init_weights``); with batch norm only the
  last convolution has a bias, as in the reference ``UnetSkipConnectionBlock``.

For super-resolution, ``upscale=f`` takes the low-resolution input (H/f x W/f) and upsamples it (bicubic by
default) before the first convolution, so the U-Net works at the target resolution and its skips carry the
input at full resolution; the output is H x W. The net is fully convolutional: any input whose upsampled height
and width are multiples of ``2**depth`` works (an SR model trained at 32x32 upscales 64x64 images), and any
other size is refused with one paragraph.

:class:`PatchDiscriminator` -- the PatchGAN (the reference ``NLayerDiscriminator``): ``n_layers`` 4x4 stride-2
convolutions, one 4x4 stride-1 convolution, and a 4x4 stride-1 convolution to one score per patch. With
``n_layers=3`` (the paper's default) each score sees a 70x70 patch of the input (:func:`receptive_field`
computes it); 1 and 2 layers give 16x16 and 34x34 patches, which suit 32x32 images better. pix2pix's
discriminator is conditional: ``condition_channels > 0`` scores the pair (input, output) as
``net(cat([input, output], 1))``, the input first as in the reference code (upsampled by ``upscale`` first for
super-resolution); ``condition_channels=0`` is CycleGAN's unconditional discriminator.

Normalisation (``norm=``): ``batch`` is the paper's. gencli's sampling must not depend on batch composition, so
a model that samples in eval mode uses the running statistics; ``instance`` is what the paper's batch-size-1
runs computed and depends on nothing but the image; ``none`` for tests and ablations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.nets.conv import ConfigError  # gencli.errors.ConfigError, through an existing nets module

NORMS = ("batch", "instance", "none")
UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


def pix2pix_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        # The reference code's instance norm: no affine, no running statistics.
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm={kind!r} is not a normalisation of the pix2pix/CycleGAN nets; use one of "
                      f"{', '.join(NORMS)} (batch is the paper's).")


def check_upscale(upscale: int, mode: str) -> int:
    value = int(upscale)
    if value != upscale or value < 1:
        raise ConfigError(f"upscale={upscale!r} must be a whole factor >= 1 (1: the input is already at the output "
                          "resolution; 2, 4 or 8 for super-resolution).")
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"upsample={mode!r} is not an upsampling mode; use one of {', '.join(UPSAMPLE_MODES)}.")
    return value


def upsample(x: Tensor, factor: int, mode: str = "bicubic") -> Tensor:
    """``x`` (N, C, h, w) -> (N, C, h*factor, w*factor); identity for factor 1. Bicubic overshoots are kept."""
    if factor == 1:
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x, scale_factor=factor, mode=mode, **kwargs)


def init_pix2pix_weights(module: nn.Module, std: float = 0.02) -> None:
    """The reference ``init_weights(net, 'normal', 0.02)``: conv weights N(0, std), biases 0, norm scales N(1, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def unet_depth(image_size: int) -> int:
    """The number of stride-2 levels from ``image_size`` down to 1x1 (the paper's 8 for 256)."""
    size = int(image_size)
    if size != image_size or size < 4 or size & (size - 1):
        raise ConfigError(f"image size {image_size} is not supported by the pix2pix U-Net: it halves the image down "
                          "to 1x1, so the size must be a power of two >= 4 (e.g. 32, 64 or 256). Set data.image_size "
                          "to one, or give the net an explicit depth.")
    return int(math.log2(size))


class UNetGenerator(nn.Module):
    """Image (N, in_channels, H/upscale, W/upscale) -> image (N, out_channels, H, W) in [-1, 1]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 64,
        max_mult: int = 8,
        norm: str = "batch",
        dropout: float = 0.5,
        dropout_layers: int = 3,
        upscale: int = 1,
        upsample_mode: str = "bicubic",
        depth: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout={dropout!r} must be in [0, 1) (the paper's 0.5; 0 turns it off).")
        self.upscale = check_upscale(upscale, upsample_mode)
        self.upsample_mode = upsample_mode
        self.depth = unet_depth(image_size) if depth is None else int(depth)
        if self.depth < 2:
            raise ConfigError(f"the pix2pix U-Net needs depth >= 2 (got {depth}).")
        self.in_channels, self.out_channels, self.image_size = int(in_channels), int(out_channels), int(image_size)
        ch = [base_channels * min(2**i, max_mult) for i in range(self.depth)]
        bias = norm != "batch"
        last = self.depth - 1
        downs, ups = [], []
        for i in range(self.depth):
            c_in = in_channels if i == 0 else ch[i - 1]
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(c_in, ch[i], 4, 2, 1, bias=bias))
            if 0 < i < last:
                layers.append(pix2pix_norm(norm, ch[i]))
            downs.append(nn.Sequential(*layers))
            up_in = ch[i] if i == last else 2 * ch[i]
            up_out = out_channels if i == 0 else ch[i - 1]
            up: list[nn.Module] = [nn.ReLU(True), nn.ConvTranspose2d(up_in, up_out, 4, 2, 1, bias=bias or i == 0)]
            if i == 0:
                up.append(nn.Tanh())
            else:
                up.append(pix2pix_norm(norm, up_out))
                # decoder layer k (k = 0 the innermost) is level last - k: the first `dropout_layers` get dropout
                if dropout > 0 and last - i < dropout_layers:
                    up.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*up))
        self.downs = nn.ModuleList(downs)
        self.ups = nn.ModuleList(ups)
        init_pix2pix_weights(self)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"the U-Net takes (N, {self.in_channels}, H, W) images; got shape {tuple(x.shape)}.")
        multiple = 2**self.depth
        h, w = x.shape[-2] * self.upscale, x.shape[-1] * self.upscale
        if h % multiple or w % multiple:
            step = multiple // math.gcd(multiple, self.upscale)
            raise ConfigError(
                f"a {x.shape[-2]}x{x.shape[-1]} input cannot go through this U-Net: it upsamples by {self.upscale} "
                f"and halves {self.depth} times, so the input's height and width must be multiples of {step} "
                f"(the output's of {multiple}). Crop or pad the images to such a size."
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        h = upsample(x, self.upscale, self.upsample_mode)
        skips = []
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[-1](skips[-1])
        for i in range(self.depth - 2, -1, -1):
            h = self.ups[i](torch.cat([skips[i], h], 1))
        return h


def patchgan_layers(n_layers: int) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of each convolution of an ``n_layers`` PatchGAN, input to output."""
    return [(4, 2, 1)] * int(n_layers) + [(4, 1, 1), (4, 1, 1)]


def receptive_field(n_layers: int = 3) -> int:
    """The side of the input patch one PatchGAN score sees: 70 for n_layers=3 (34 for 2, 16 for 1)."""
    size = 1
    for kernel, stride, _ in reversed(patchgan_layers(n_layers)):
        size = (size - 1) * stride + kernel
    return size


def field_of(n_layers: int, row: int, col: int) -> tuple[int, int, int, int]:
    """Input rows [top, bottom] and columns [left, right] (inclusive, before clipping to the image) seen by score
    (row, col): each layer maps output span [a, b] to input span [a*s - p, b*s - p + k - 1]."""
    top, bottom, left, right = row, row, col, col
    for kernel, stride, pad in reversed(patchgan_layers(n_layers)):
        top, bottom = top * stride - pad, bottom * stride - pad + kernel - 1
        left, right = left * stride - pad, right * stride - pad + kernel - 1
    return top, bottom, left, right


class PatchDiscriminator(nn.Module):
    """(image, condition) -> a map of patch scores (logits), (N, 1, h, w).

    ``condition_channels=0``: unconditional (CycleGAN). Otherwise pix2pix's conditional discriminator on
    ``cat([condition, image], 1)``; ``upscale=f`` upsamples a low-resolution condition to the image's size first.
    """

    def __init__(
        self,
        image_channels: int,
        condition_channels: int = 0,
        base_channels: int = 64,
        n_layers: int = 3,
        max_mult: int = 8,
        norm: str = "batch",
        upscale: int = 1,
        upsample_mode: str = "bicubic",
    ):
        super().__init__()
        if int(n_layers) != n_layers or n_layers < 1:
            raise ConfigError(f"n_layers={n_layers!r} must be a whole number >= 1 (3: the paper's 70x70 PatchGAN).")
        self.n_layers = int(n_layers)
        self.image_channels, self.condition_channels = int(image_channels), int(condition_channels)
        self.upscale = check_upscale(upscale, upsample_mode)
        self.upsample_mode = upsample_mode
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(image_channels + condition_channels, base_channels, 4, 2, 1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, self.n_layers + 1):
            prev, mult = mult, min(2**n, max_mult)
            stride = 2 if n < self.n_layers else 1
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=bias),
                       pix2pix_norm(norm, base_channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_pix2pix_weights(self)

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.n_layers)

    def forward(self, image: Tensor, condition: Tensor | None = None) -> Tensor:
        if self.condition_channels:
            if condition is None:
                raise ConfigError("this PatchGAN is conditional: it scores (input, output) pairs, give the input too.")
            condition = upsample(condition, self.upscale, self.upsample_mode)
            if condition.shape[-2:] != image.shape[-2:]:
                raise ConfigError(f"the PatchGAN's condition is {tuple(condition.shape[-2:])} after upsampling by "
                                  f"{self.upscale}, the image {tuple(image.shape[-2:])}: they must match.")
            image = torch.cat([condition, image], 1)
        elif condition is not None:
            raise ConfigError("this PatchGAN is unconditional (condition_channels=0); give the image alone.")
        return self.net(image)
