"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN"), written from the paper and read against NVlabs/stylegan2-ada-pytorch ``training/networks.py``.

Generator = mapping network (z [+ label embedding] -> w, 8 equalised-lr layers with lr multiplier 0.01, a tracked
w_avg for truncation) + skip synthesis network (a learned 4x4 constant, per resolution two modulated/demodulated
3x3 convolutions with per-pixel noise and a modulated 1x1 ToRGB whose output is upsampled and summed).
Discriminator = ResNet: FromRGB, per resolution two 3x3 convolutions (the second downsampling) with a 1x1 skip, both
scaled by sqrt(1/2); at 4x4 minibatch standard deviation, a 3x3 conv, a dense layer and the score, plus a projection
term <embed(y), h> when conditional (Miyato & Koyama 2018).

Simplifications against the reference (documented, not hidden): up/downsampling is bilinear interpolation / 2x2
average pooling instead of the [1,3,3,1] FIR filter; no fp16 or conv clamping. Images are the linear output of the
last ToRGB (no tanh), as in the paper; data are in [-1, 1].

The 1x1 layers (ToRGB, FromRGB, the discriminator's skip) run as einsums, not convolutions: see dcgan.py's note on
pytorch/pytorch#171622 (1x1 convolution backward under channels_last and torch.compile).

Slots: ``StyleGAN2Generator(latent_dim, out_channels, image_size, ..., num_classes)`` called as ``G(z)`` / ``G(z, y)``
with ``truncation=psi`` for the truncation trick in w; ``StyleGAN2Discriminator(in_channels, image_size, ...,
num_classes)`` called as ``D(x)`` / ``D(x, y)`` returning one raw score per image, shape (N,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.nets.conditioning import check_num_classes
from gencli.nets.conv import check_image_size

SQRT2 = math.sqrt(2.0)


def lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU (0.2) with the gain sqrt(2) that keeps unit variance (StyleGAN's ``lrelu`` activation)."""
    return F.leaky_relu(x, 0.2) * SQRT2


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def stylegan2_channels(image_size: int, channel_base: int, max_channels: int) -> dict[int, int]:
    """Channels per resolution 4..image_size: min(channel_base // res, max_channels) (at least 1)."""
    stages = check_image_size(image_size)
    if channel_base < 1 or max_channels < 1:
        raise ConfigError(f"channel_base={channel_base} and max_channels={max_channels} must be positive.")
    return {4 * 2**i: max(1, min(channel_base // (4 * 2**i), max_channels)) for i in range(stages + 1)}


class EqualLinear(nn.Module):
    """Dense layer with the equalised learning rate: the parameter is stored as N(0, 1/lr_mul^2) and used as
    ``weight * lr_mul / sqrt(in_features)``; the bias is stored as bias/lr_mul and used times lr_mul. With plain SGD
    or Adam this makes the layer's effective learning rate lr * lr_mul (the mapping network's 0.01)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        if lr_mul <= 0:
            raise ConfigError(f"lr_mul={lr_mul} must be > 0 (the mapping network uses 0.01).")
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.activation = activation

    def effective_weight(self) -> Tensor:
        return self.weight * self.weight_gain

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.bias_gain if self.bias is not None else None
        x = F.linear(x, self.effective_weight().to(x.dtype), None if b is None else b.to(x.dtype))
        return lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """k x k convolution (k >= 3 here) with the equalised learning rate (weight N(0,1) times 1/sqrt(fan_in)),
    optional 2x2 average-pool downsampling after it, optional lrelu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 activation: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation, self.down, self.padding = activation, down, kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, (self.weight * self.gain).to(x.dtype), padding=self.padding)
        if self.down:
            x = F.avg_pool2d(x, 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return lrelu(x) if self.activation else x


class Equal1x1(nn.Module):
    """1x1 convolution with the equalised learning rate, run as an einsum (see the module note)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.gain = 1.0 / math.sqrt(in_channels)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = torch.einsum("nchw,oc->nohw", x, (self.weight * self.gain).to(x.dtype))
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return lrelu(x) if self.activation else x


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, padding: int = 0,
                     eps: float = 1e-8) -> Tensor:
    """StyleGAN2's modulated convolution as one grouped convolution: per sample n the weight
    w'_n[o,i,:,:] = weight[o,i,:,:] * styles[n,i], demodulated (divided by sqrt(sum_{i,k} w'^2 + eps)) when asked,
    and x[n] convolved with w'_n. ``weight`` already carries its equalised-lr gain."""
    n, c, h, w_ = x.shape
    out_c = weight.shape[0]
    wgt = weight.unsqueeze(0) * styles.view(n, 1, c, 1, 1)  # (N, O, I, k, k)
    if demodulate:
        wgt = wgt * (wgt.square().sum(dim=[2, 3, 4], keepdim=True) + eps).rsqrt()
    out = F.conv2d(x.reshape(1, n * c, h, w_), wgt.reshape(n * out_c, c, *weight.shape[2:]).to(x.dtype),
                   padding=padding, groups=n)
    return out.view(n, out_c, *out.shape[2:])


class ModulatedConv2d(nn.Module):
    """A modulated 3x3 convolution: styles = affine(w) (bias initialised to 1), optional x2 upsampling before it,
    demodulation, per-pixel noise (learned strength, starting at 0), bias and lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 3, up: bool = False,
                 demodulate: bool = True, resolution: int | None = None):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.up, self.demodulate, self.padding, self.resolution = up, demodulate, kernel_size // 2, resolution
        if resolution is not None:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random") -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight * self.gain, self.affine(w), self.demodulate, self.padding)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        elif noise_mode != "none":
            raise ConfigError(f"noise_mode={noise_mode!r}: use random, const or none.")
        return lrelu(x + self.bias.to(x.dtype).view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1x1 convolution without demodulation, plus a bias, as an einsum."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels))
        self.gain = 1.0 / math.sqrt(in_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.gain  # (N, C)
        wgt = self.weight.unsqueeze(0) * styles.unsqueeze(1)  # (N, O, C)
        return torch.einsum("nchw,noc->nohw", x, wgt.to(x.dtype)) + self.bias.to(x.dtype).view(1, -1, 1, 1)


class MappingNetwork(nn.Module):
    """z (N, z_dim) [+ labels] -> w (N, w_dim). z is normalised to unit second moment; a label is embedded (one-hot
    through an equalised dense layer), normalised and concatenated. ``num_layers`` lrelu dense layers with lr
    multiplier ``lr_mul``. In training mode each call moves the tracked ``w_avg`` toward the batch mean w
    (w_avg <- batch_mean + beta * (w_avg - batch_mean)), the centre of the truncation trick."""

    def __init__(self, z_dim: int, w_dim: int, num_classes: int | None = None, num_layers: int = 8,
                 lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        if z_dim < 1 or w_dim < 1 or num_layers < 1:
            raise ConfigError(f"z_dim={z_dim}, w_dim={w_dim} and mapping_layers={num_layers} must be positive.")
        self.z_dim, self.w_dim, self.num_classes = z_dim, w_dim, check_num_classes(num_classes)
        self.embed = EqualLinear(self.num_classes, w_dim) if self.num_classes else None
        in_dim = z_dim + (w_dim if self.embed is not None else 0)
        self.layers = nn.ModuleList(
            EqualLinear(in_dim if i == 0 else w_dim, w_dim, lr_mul=lr_mul, activation=True) for i in range(num_layers))
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, labels: Tensor | None = None, truncation: float | None = None,
                truncation_cutoff: int | None = None, num_ws: int = 1, update_w_avg: bool | None = None) -> Tensor:
        """(N, num_ws, w_dim): w broadcast to every layer, truncated (w_avg + psi (w - w_avg)) in the first
        ``truncation_cutoff`` layers (all when None) when ``truncation`` is given."""
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            if labels is None:
                raise ConfigError("this StyleGAN2 generator is class-conditional: pass labels=.")
            x = torch.cat([x, normalize_2nd_moment(self.embed(F.one_hot(labels.long(), self.num_classes).to(x.dtype)))], 1)
        for layer in self.layers:
            x = layer(x)
        if self.training if update_w_avg is None else update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, num_ws, 1)
        if truncation is not None and truncation != 1:
            return truncate(ws, self.w_avg, truncation, truncation_cutoff)
        return ws


def truncate(ws: Tensor, w_avg: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
    """The truncation trick in w: w_avg + psi * (w - w_avg) in layers [0, cutoff) (all when cutoff is None)."""
    out = ws.clone()
    cut = ws.shape[1] if cutoff is None else int(cutoff)
    out[:, :cut] = w_avg.to(ws.dtype).lerp(ws[:, :cut], psi)
    return out


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int):
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = ModulatedConv2d(in_channels, out_channels, w_dim, up=True, resolution=resolution)
        self.conv1 = ModulatedConv2d(out_channels, out_channels, w_dim, resolution=resolution)
        self.torgb = ToRGB(out_channels, img_channels, w_dim)
        self.num_ws = 2 if self.conv0 is None else 3  # conv0, conv1, torgb (torgb's w is the next conv0's)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str) -> tuple[Tensor, Tensor]:
        if self.conv0 is None:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1).to(ws.dtype)
            x = self.conv1(x, ws[:, 0], noise_mode)
            rgb = self.torgb(x, ws[:, 1])
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
            rgb = self.torgb(x, ws[:, 2])
        img = rgb if img is None else F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> image; num_ws = 2 * number of resolutions (4, 8, ..., image_size)."""

    def __init__(self, w_dim: int, image_size: int, img_channels: int, channel_base: int, max_channels: int):
        super().__init__()
        chans = stylegan2_channels(image_size, channel_base, max_channels)
        self.blocks = nn.ModuleList()
        prev = 0
        for res, ch in chans.items():
            self.blocks.append(SynthesisBlock(prev, ch, w_dim, res, img_channels))
            prev = ch
        self.num_ws = 2 * len(self.blocks)

    def forward(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        if ws.shape[1] != self.num_ws:
            raise ValueError(f"expected {self.num_ws} ws, got {ws.shape[1]}")
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_ws], noise_mode)
            i += block.num_ws - 1
        return img


class StyleGAN2Generator(nn.Module):
    """Latent (N, latent_dim) [+ labels (N,)] -> image (N, out_channels, image_size, image_size).

    ``style_mixing_prob``: in training mode, with this probability per batch the ws from index k on (k uniform in
    [1, num_ws)) come from a second latent (the paper's mixing regularisation; 0.9 there, 0 turns it off).
    The defaults (channel_base 1024, max_channels 128, w_dim 128) are small enough for a CPU; the paper's 32x32
    CIFAR setting (stylegan2-ada --cfg=cifar) is channel_base 32768, max_channels 512, w_dim 512, mapping_layers 2,
    with style mixing and path length off."""

    def __init__(self, latent_dim: int = 128, out_channels: int = 3, image_size: int = 32,
                 w_dim: int = 128, channel_base: int = 1024, max_channels: int = 128, mapping_layers: int = 8,
                 mapping_lr_mul: float = 0.01, w_avg_beta: float = 0.995, style_mixing_prob: float = 0.9,
                 num_classes: int | None = None):
        super().__init__()
        if latent_dim < 1 or out_channels < 1:
            raise ConfigError(f"latent_dim={latent_dim} and out_channels={out_channels} must be positive.")
        if not 0.0 <= style_mixing_prob <= 1.0:
            raise ConfigError(f"style_mixing_prob={style_mixing_prob} must be in [0, 1] (0.9 in the paper, 0: off).")
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.num_classes = check_num_classes(num_classes)
        self.style_mixing_prob = style_mixing_prob
        self.synthesis = SynthesisNetwork(w_dim, image_size, out_channels, channel_base, max_channels)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(latent_dim, w_dim, num_classes, mapping_layers, mapping_lr_mul, w_avg_beta)

    def mapping_ws(self, z: Tensor, labels: Tensor | None = None, truncation: float | None = None,
                   truncation_cutoff: int | None = None, mixing: bool | None = None) -> Tensor:
        """The ws the synthesis network takes, with style mixing when ``mixing`` (default: training mode)."""
        ws = self.mapping(z, labels, truncation, truncation_cutoff, num_ws=self.num_ws)
        if (self.training if mixing is None else mixing) and self.style_mixing_prob > 0 and self.num_ws > 1:
            if torch.rand(()).item() < self.style_mixing_prob:
                cut = int(torch.randint(1, self.num_ws, ()).item())
                ws2 = self.mapping(torch.randn_like(z), labels, truncation, truncation_cutoff, num_ws=self.num_ws,
                                   update_w_avg=False)
                ws = torch.cat([ws[:, :cut], ws2[:, cut:]], 1)
        return ws

    def forward(self, z: Tensor, labels: Tensor | None = None, truncation: float | None = None,
                truncation_cutoff: int | None = None, noise_mode: str = "random") -> Tensor:
        return self.synthesis(self.mapping_ws(z, labels, truncation, truncation_cutoff), noise_mode)


def minibatch_stddev(x: Tensor, group_size: int = 4, num_channels: int = 1) -> Tensor:
    """Append the minibatch standard deviation (Karras et al. 2018): within groups of G samples (G = gcd(N,
    group_size)), the std over the group of each feature, averaged over C/num_channels, H, W, as extra channels."""
    n, c, h, w = x.shape
    g = math.gcd(n, group_size) or 1
    f = num_channels
    y = x.reshape(g, -1, f, c // f, h, w).float()
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=[2, 3, 4])  # (N/G, F)
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return torch.cat([x, y], 1)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels)
        self.conv1 = EqualConv2d(in_channels, out_channels, down=True)
        self.skip = Equal1x1(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.skip(F.avg_pool2d(x, 2))
        return (y + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """Image (N, in_channels, image_size, image_size) [+ labels] -> one raw score per image, shape (N,)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, channel_base: int = 1024, max_channels: int = 128,
                 mbstd_group_size: int = 4, mbstd_num_channels: int = 1, num_classes: int | None = None):
        super().__init__()
        chans = stylegan2_channels(image_size, channel_base, max_channels)
        if chans[4] % mbstd_num_channels:
            raise ConfigError(f"mbstd_num_channels={mbstd_num_channels} must divide the 4x4 channels ({chans[4]}).")
        self.in_channels, self.image_size = in_channels, image_size
        self.num_classes = check_num_classes(num_classes)
        self.mbstd_group_size, self.mbstd_num_channels = mbstd_group_size, mbstd_num_channels
        self.fromrgb = Equal1x1(in_channels, chans[image_size], activation=True)
        resolutions = sorted(chans, reverse=True)
        self.blocks = nn.ModuleList(DiscriminatorBlock(chans[r], chans[r // 2]) for r in resolutions[:-1])
        c4 = chans[4]
        self.conv = EqualConv2d(c4 + mbstd_num_channels, c4)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)
        self.embed = nn.Embedding(self.num_classes, c4) if self.num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 1.0 / math.sqrt(c4))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.fromrgb(x)
        for block in self.blocks:
            h = block(h)
        h = self.conv(minibatch_stddev(h, self.mbstd_group_size, self.mbstd_num_channels))
        h = self.fc(h.flatten(1))
        score = self.out(h).flatten()
        if self.embed is not None:
            if labels is None:
                raise ConfigError("this StyleGAN2 discriminator is class-conditional: pass labels=.")
            score = score + (self.embed(labels.long()) * h).sum(1)
        return score


__all__ = ["EqualLinear", "EqualConv2d", "Equal1x1", "ModulatedConv2d", "ToRGB", "MappingNetwork",
           "SynthesisNetwork", "StyleGAN2Generator", "StyleGAN2Discriminator", "modulated_conv2d", "truncate",
           "minibatch_stddev", "stylegan2_channels", "lrelu"]
