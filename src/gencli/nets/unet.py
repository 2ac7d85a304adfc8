"""The DDPM UNet (Ho et al. 2020, appendix B), a plain nn.Module: (x_t, t) -> prediction, same shape as x_t.

It knows nothing about noise schedules (see ``gencli.diffusion``). Structure, as in the paper's
reference code (diffusion_tf ``models/unet.py``):

- sinusoidal embedding of t (Transformer-style) -> Linear -> SiLU -> Linear (4 * ch), added to every
  residual block;
- residual blocks: GroupNorm -> SiLU -> 3x3 conv -> + time projection -> GroupNorm -> SiLU ->
  dropout -> 3x3 conv (zero-initialised, so each block starts as the identity), 1x1 skip when the
  width changes;
- single-head self-attention blocks at the resolutions in ``attn_resolutions``;
- ``len(ch_mult)`` levels of ``num_res_blocks`` blocks; each level but the last halves the resolution
  (strided 3x3 conv) on the way down and doubles it (nearest + 3x3 conv) on the way up, with skip
  connections from every down block; a middle of res-attn-res.

The paper's CIFAR-10 net (``ch=128, ch_mult=[1,2,2,2], num_res_blocks=2, attn_resolutions=[16],
dropout=0.1``) has 35.7M parameters (``conf/model/net/unet_ddpm_cifar10.yaml``). Any power-of-two image size works
as long as it can be halved ``len(ch_mult) - 1`` times.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.nets.conditioning import check_num_classes, class_embedding

log = logging.getLogger(__name__)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim): [sin(t w_i), cos(t w_i)], w_i = max_period^(-i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest divisor of ``channels`` below it (narrow CPU nets)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the reference code's init_scale=1e-10: blocks start as identities
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (N, HW, C)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] | list[int] = (16,),
        dropout: float = 0.1,
        out_channels: int | None = None,
        norm_groups: int = 32,
        num_classes: int | None = None,
    ):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]
        levels = len(ch_mult)
        if not ch_mult or min(ch_mult) < 1 or norm_groups < 1:
            raise ConfigError(f"model.net: ch_mult={ch_mult}, norm_groups={norm_groups}: need at least one level, every "
                              "multiplier >= 1 and norm_groups >= 1 (DDPM: ch_mult=[1,2,2,2], norm_groups=32).")
        if image_size < 2 ** (levels - 1) or image_size & (image_size - 1) or image_size < 4:
            raise ConfigError(
                f"image size {image_size} does not fit the UNet: it needs a power of two that can be halved "
                f"{levels - 1} times (model.net.ch_mult has {levels} levels). Use data.image_size=32 (or 16, 64), "
                "or fewer levels in model.net.ch_mult."
            )
        if num_res_blocks < 1 or ch < 1 or not 0 <= dropout < 1:
            raise ConfigError(f"model.net: num_res_blocks={num_res_blocks}, ch={ch}, dropout={dropout}: need "
                              "num_res_blocks >= 1, ch >= 1 and 0 <= dropout < 1.")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.ch = int(ch)
        out_channels = out_channels or in_channels
        temb_ch = 4 * ch
        attn = {int(r) for r in attn_resolutions}
        resolutions = [image_size // 2**level for level in range(levels)]
        if attn - set(resolutions):
            # A warning, not an error: the named configs fix attention resolutions while image_size follows the data.
            log.warning("model.net.attn_resolutions=%s: no UNet level at %s for %dx%d images (levels: %s), so "
                        "no block attends at that size (the middle block always attends). Choose among the levels, e.g. "
                        "model.net.attn_resolutions=[%d].", sorted(attn), sorted(attn - set(resolutions)),
                        image_size, image_size, resolutions, resolutions[min(1, levels - 1)])
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        #: Class-conditional: a learned class embedding added to the time embedding (as in Ho & Salimans 2022 and
        #: diffusers' UNet2DModel num_class_embeds); index num_classes is the "no class" token of guidance.
        self.num_classes = check_num_classes(num_classes)
        self.class_embed = nn.Embedding(self.num_classes + 1, temb_ch) if self.num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # ---- down: remember every output's width for the skip connections
        self.down = nn.ModuleList()
        skips, width, res = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleDict({"res": ResBlock(width, ch * mult, temb_ch, dropout, norm_groups)})
                width = ch * mult
                if res in attn:
                    block["attn"] = AttnBlock(width, norm_groups)
                self.down.append(block)
                skips.append(width)
            if level != levels - 1:
                self.down.append(nn.ModuleDict({"down": Downsample(width)}))
                skips.append(width)
                res //= 2

        self.mid_res1 = ResBlock(width, width, temb_ch, dropout, norm_groups)
        self.mid_attn = AttnBlock(width, norm_groups)
        self.mid_res2 = ResBlock(width, width, temb_ch, dropout, norm_groups)

        # ---- up: num_res_blocks + 1 blocks per level, each eating one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleDict({"res": ResBlock(width + skips.pop(), ch * mult, temb_ch, dropout, norm_groups)})
                width = ch * mult
                if res in attn:
                    block["attn"] = AttnBlock(width, norm_groups)
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleDict({"up": Upsample(width)}))
                res *= 2
        assert not skips
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``y``: class labels (N,) of a conditional net, ``num_classes`` (or None) for "no class"."""
        temb = self.temb(timestep_embedding(t, self.ch)) + class_embedding(self.class_embed, y, len(x), x.device)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if "down" in block:
                h = block["down"](h)
            else:
                h = block["res"](h, temb)
                if "attn" in block:
                    h = block["attn"](h)
            hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for block in self.up:
            if "up" in block:
                h = block["up"](h)
            else:
                h = block["res"](torch.cat([h, hs.pop()], dim=1), temb)
                if "attn" in block:
                    h = block["attn"](h)
        return self.conv_out(F.silu(self.norm_out(h)))
