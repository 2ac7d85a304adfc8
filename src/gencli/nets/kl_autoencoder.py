"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), a plain nn.Module.

The first stage of Stable Diffusion: an image (N, C, H, W) is encoded to a diagonal Gaussian over a small latent
*image* (N, z_channels, H/f, W/f), and decoded back. It follows latent-diffusion's ``ldm/models/autoencoder.py``
``AutoencoderKL`` and ``ldm/modules/diffusionmodules/model.py`` ``Encoder``/``Decoder`` (the layout diffusers'
``AutoencoderKL`` also has, see :mod:`gencli.nets.diffusers_autoencoder_kl`):

- encoder: 3x3 conv to ``ch``; ``len(ch_mult)`` levels of ``num_res_blocks`` ResNet blocks of width
  ``ch * ch_mult[level]``, each level but the last followed by a stride-2 3x3 conv (padding (0, 1, 0, 1), as the
  reference code); a middle of ResNet block, single-head self-attention (``mid_attention``), ResNet block;
  GroupNorm, SiLU, 3x3 conv to ``2 * z_channels`` (mean and log-variance); then a 1x1 ``quant_conv``;
- decoder: 1x1 ``post_quant_conv``; 3x3 conv from ``z_channels``; the same middle; the levels in reverse, with
  ``num_res_blocks + 1`` blocks each and nearest x2 + 3x3 conv between levels; GroupNorm, SiLU, 3x3 conv.
- the downsampling factor is f = 2 ** (len(ch_mult) - 1): ch_mult [1, 2] is f = 2, [1, 2, 4] f = 4 (the paper's
  KL-f4: ch 128, z_channels 3), [1, 2, 4, 4] f = 8 (KL-f8 and Stable Diffusion's VAE: z_channels 4).
- the ResNet blocks have no time embedding and keep PyTorch's default initialisation (as the reference code).

State-dict keys are latent-diffusion's (``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight``,
...), so a latent-diffusion first-stage ``state_dict`` (less its ``loss.`` entries) loads as it is.

Attention at the levels themselves (latent-diffusion's ``attn_resolutions``) is not offered: none of the paper's
KL configs uses it and diffusers' ``AutoencoderKL`` has no place for it, so every net here exports.

Of :mod:`gencli.nets.unet`, only ``Upsample`` is the same block; the UNet's ``ResBlock`` takes a time embedding and
starts as the identity, its ``Downsample`` pads symmetrically and its ``AttnBlock`` fuses q, k and v into one conv,
none of which matches the reference weights' layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.nets.unet import Upsample


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latent images, from the encoder's (N, 2 * C, H, W) moments (mean first).

    As latent-diffusion's ``DiagonalGaussianDistribution``: the log-variance is clamped to [-30, 20], ``kl()`` is
    KL(q || N(0, I)) summed over (C, H, W), one value per image.
    """

    def __init__(self, moments: Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (N, 2*C, H, W), got shape {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps, eps ~ N(0, I) (reparameterised: differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per image, (N,); ``other`` None is the standard normal prior."""
        if other is None:
            terms = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).square() / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: Tensor) -> Tensor:
        """-log q(sample) per image, (N,)."""
        return 0.5 * (math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).square() / self.var).sum(dim=(1, 2, 3))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> GroupNorm -> SiLU -> dropout -> 3x3 conv, plus the input (1x1 conv when the
    width changes: ``nin_shortcut``)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 convs ``q``, ``k``, ``v``, ``proj_out``), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(n, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the reference code
        return x + self.proj_out(out.squeeze(1).transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding right and bottom by one (the reference code's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _middle(width: int, attention: bool, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(width, width, dropout, groups)
    mid.attn_1 = AttnBlock(width, groups) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(width, width, dropout, groups)
    return mid


class Encoder(nn.Module):
    """Image (N, in_channels, H, W) -> moments (N, 2 * z_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 mid_attention: bool, dropout: float, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(width, ch * mult, dropout, groups))
                width = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = _middle(width, mid_attention, dropout, groups)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (N, z_channels, H/f, W/f) -> image (N, out_channels, H, W), unbounded (no tanh, as the reference)."""

    def __init__(self, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 mid_attention: bool, dropout: float, groups: int):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _middle(width, mid_attention, dropout, groups)
        up: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, ch * ch_mult[level], dropout, groups))
                width = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(width)
            up.insert(0, stage)  # up[level], as the reference: up[0] is the full-resolution level
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """Encoder + 1x1 quant_conv -> :class:`DiagonalGaussian` over (z_channels, H/f, W/f); 1x1 post_quant_conv +
    decoder back to the image.

    ``downsample``: the factor f, if given, must equal 2 ** (len(ch_mult) - 1) (a check, so a config can say what
    it means). Defaults are the paper's KL-f4 (``models/first_stage_models/kl-f4/config.yaml``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 3,
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        downsample: int | None = None,
        out_channels: int | None = None,
    ):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]
        if len(ch_mult) < 2 or min(ch_mult) < 1:
            raise ConfigError(f"model.net.ch_mult={ch_mult}: the KL autoencoder needs at least 2 levels, every "
                              "multiplier >= 1; the downsampling factor is f = 2 ** (levels - 1): ch_mult=[1,2] for "
                              "f=2, [1,2,4] for f=4, [1,2,4,4] for f=8.")
        f = 2 ** (len(ch_mult) - 1)
        if downsample is not None and int(downsample) != f:
            raise ConfigError(f"model.net.downsample={downsample} does not match model.net.ch_mult={ch_mult}, which "
                              f"downsamples by f = 2 ** {len(ch_mult) - 1} = {f}. Give ch_mult "
                              f"{len(ch_mult)} levels for f={f}, or log2(downsample) + 1 levels (e.g. [1,2,4] for 4).")
        if ch < 1 or num_res_blocks < 1 or z_channels < 1 or not 0 <= dropout < 1 or norm_groups < 1:
            raise ConfigError(f"model.net: ch={ch}, num_res_blocks={num_res_blocks}, z_channels={z_channels}, "
                              f"dropout={dropout}, norm_groups={norm_groups}: need ch, num_res_blocks, z_channels and "
                              "norm_groups >= 1 and 0 <= dropout < 1 (KL-f4: ch=128, num_res_blocks=2, z_channels=3).")
        widths = sorted({ch * m for m in ch_mult})
        if any(w % norm_groups for w in widths):
            raise ConfigError(f"model.net.norm_groups={norm_groups} does not divide every width of the KL "
                              f"autoencoder ({widths} = ch * ch_mult): GroupNorm needs it to. Choose norm_groups "
                              f"dividing {math.gcd(*widths)} (e.g. model.net.norm_groups={math.gcd(*widths, 32)}), "
                              "or a ch that is a multiple of it.")
        if image_size < f or image_size % f:
            raise ConfigError(f"image size {image_size} does not fit the KL autoencoder: its downsampling factor "
                              f"f={f} (model.net.ch_mult={ch_mult}) must divide it. Use data.image_size={max(f, image_size // f * f)}, "
                              "or fewer levels in model.net.ch_mult.")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.image_size = int(image_size)
        self.z_channels = int(z_channels)
        self.downsample_factor = f
        #: The constructor's arguments, as saved in a checkpoint and read by the diffusers export.
        self.config = dict(in_channels=self.in_channels, image_size=self.image_size, ch=int(ch), ch_mult=ch_mult,
                           num_res_blocks=int(num_res_blocks), z_channels=self.z_channels,
                           mid_attention=bool(mid_attention), dropout=float(dropout), norm_groups=int(norm_groups),
                           downsample=f, out_channels=self.out_channels)
        args = (ch, ch_mult, num_res_blocks, z_channels, bool(mid_attention), dropout, norm_groups)
        self.encoder = Encoder(self.in_channels, *args)
        self.decoder = Decoder(self.out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, H/f, W/f) for the configured square image size."""
        side = self.image_size // self.downsample_factor
        return (self.z_channels, side, side)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last conv weight: the layer the adaptive GAN weight compares gradients at."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"KLAutoencoder.encode needs (N, C, H, W) with H and W multiples of f={f}, "
                             f"got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); the reconstruction decodes a sample of the posterior (its mean if
        ``sample_posterior`` is False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
