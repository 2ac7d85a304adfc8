"""Differentiable augmentation of the images a GAN discriminator sees, for training on little data.

Both apply to real and fake images alike, before D, in D's and G's steps (and in the R1 pass), so that D cannot
tell real from fake by the augmentation and G's gradient flows back through it. Every random draw comes from the
``generator`` passed to the call (a CPU ``torch.Generator``; the global RNG when None), so a seed fixes the
augmentation on any device. All are plain differentiable tensor operations (arithmetic, gather, where).

- :class:`DiffAugment` (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"), written
  from the paper's reference ``DiffAugment_pytorch.py``: policy ``color`` (brightness + U(-0.5, 0.5), saturation
  x U(0, 2) about the channel mean, contrast x U(0.5, 1.5) about the image mean), ``translation`` (integer shifts
  of up to 1/8 of the size, zeros shifted in), ``cutout`` (a zero square of half the size at a random place).
  Applied to every image, always (no probability).
- :class:`AugmentPipe` (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data", ADA),
  read against NVlabs/stylegan2-ada-pytorch ``training/augment.py``: the pixel-blitting and colour groups of the
  paper ('bgc' minus the general geometric transforms), each transform applied to each image independently with
  probability p: xflip, rotate90 (k in 0..3), integer translation (up to 1/8 of the size, reflect padding),
  brightness (+ N(0, 0.2)), contrast (x 2^N(0, 0.5)), saturation (about the grey axis, x 2^N(0, 1)). Luma flip,
  hue rotation, isotropic/anisotropic scaling, arbitrary rotation, fractional translation and the filtering and
  corruption groups are left out. With p < ~0.8 these do not leak into the generator (the paper, section 2.2): the
  distribution of augmented images still identifies the distribution of clean ones because each transform is
  skipped with probability 1 - p > 0.
- :class:`AdaController`: the overfitting heuristic r_t = E[sign(D(x_real))] over ``interval`` minibatches and the
  update p <- clip(p + sign(r_t - target) * images / speed_images, 0, 1), with ``speed_images`` 500k so p can go
  from 0 to 1 in 500k images (ADA's ``ada_kimg`` = 500), target 0.6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencli.errors import ConfigError

DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device, low: int = 0) -> Tensor:
    return torch.randint(low, high, shape, generator=generator).to(device)


def shift_gather(x: Tensor, dy: Tensor, dx: Tensor, mode: str) -> Tensor:
    """x (N, C, H, W) shifted per sample by integer (dy, dx) (N,): out[y, x] = in[y - dy, x - dx], positions
    outside filled with zeros (mode 'zeros') or reflected (mode 'reflect', |shift| < size)."""
    n, c, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h) - dy.view(n, 1)
    xs = torch.arange(w, device=x.device).view(1, w) - dx.view(n, 1)
    if mode == "reflect":
        ys = torch.where(ys < 0, -ys, torch.where(ys >= h, 2 * h - 2 - ys, ys))
        xs = torch.where(xs < 0, -xs, torch.where(xs >= w, 2 * w - 2 - xs, xs))
        rows = x.gather(2, ys.view(n, 1, h, 1).expand(n, c, h, w))
        return rows.gather(3, xs.view(n, 1, 1, w).expand(n, c, h, w))
    pad = F.pad(x, [1, 1, 1, 1])  # index 0 and size+1 are the zero border
    ys, xs = (ys + 1).clamp(0, h + 1), (xs + 1).clamp(0, w + 1)
    rows = pad.gather(2, ys.view(n, 1, h, 1).expand(n, c, h, w + 2))
    return rows.gather(3, xs.view(n, 1, 1, w).expand(n, c, h, w))


class DiffAugment(nn.Module):
    """DiffAugment with a comma-separated ``policy`` of color, translation, cutout (default all three)."""

    def __init__(self, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5):
        super().__init__()
        self.ops = [p.strip() for p in policy.split(",") if p.strip()]
        bad = [p for p in self.ops if p not in DIFFAUGMENT_POLICIES]
        if bad:
            raise ConfigError(f"DiffAugment policy {policy!r}: {', '.join(bad)} unknown; use a comma-separated "
                              f"subset of {', '.join(DIFFAUGMENT_POLICIES)}.")
        if not 0 <= translation_ratio < 1 or not 0 <= cutout_ratio <= 1:
            raise ConfigError(f"translation_ratio={translation_ratio} must be in [0, 1) and cutout_ratio="
                              f"{cutout_ratio} in [0, 1].")
        self.translation_ratio, self.cutout_ratio = translation_ratio, cutout_ratio

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for op in self.ops:
            x = getattr(self, op)(x, generator)
        return x

    def color(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        n = len(x)
        x = x + (_rand((n, 1, 1, 1), g, x) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand((n, 1, 1, 1), g, x) * 2) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (_rand((n, 1, 1, 1), g, x) + 0.5) + mean

    def translation(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        sy, sx = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
        dy = _randint(sy + 1, (n,), g, x.device, low=-sy)
        dx = _randint(sx + 1, (n,), g, x.device, low=-sx)
        return shift_gather(x, dy, dx, "zeros")

    def cutout(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        ch, cw = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
        oy = _randint(h + (1 - ch % 2), (n,), g, x.device) - ch // 2  # top-left corner, may lie outside
        ox = _randint(w + (1 - cw % 2), (n,), g, x.device) - cw // 2
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_y = (ys.view(1, h) >= oy.view(n, 1)) & (ys.view(1, h) < (oy + ch).view(n, 1))
        in_x = (xs.view(1, w) >= ox.view(n, 1)) & (xs.view(1, w) < (ox + cw).view(n, 1))
        keep = ~(in_y.view(n, 1, h, 1) & in_x.view(n, 1, 1, w))
        return x * keep.to(x.dtype)


ADA_TRANSFORMS = ("xflip", "rotate90", "xint", "brightness", "contrast", "saturation")


class AugmentPipe(nn.Module):
    """ADA's augmentation pipe, the non-leaking subset above, each transform applied with probability ``p``
    (times its per-transform strength, 1 or 0 to switch it off). ``p`` is a buffer (checkpointed), set by
    :class:`AdaController` or fixed. Images are expected in [-1, 1] (contrast scales about 0, mid-grey)."""

    def __init__(self, p: float = 0.0, xflip: float = 1, rotate90: float = 1, xint: float = 1,
                 brightness: float = 1, contrast: float = 1, saturation: float = 1, xint_max: float = 0.125,
                 brightness_std: float = 0.2, contrast_std: float = 0.5, saturation_std: float = 1.0):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.strength = dict(xflip=xflip, rotate90=rotate90, xint=xint, brightness=brightness, contrast=contrast,
                             saturation=saturation)
        for name, s in self.strength.items():
            if not 0 <= s <= 1:
                raise ConfigError(f"augment {name}={s} must be in [0, 1] (its probability is that times p).")
        self.xint_max, self.brightness_std = xint_max, brightness_std
        self.contrast_std, self.saturation_std = contrast_std, saturation_std

    def _chosen(self, name: str, n: int, g: torch.Generator | None, like: Tensor) -> Tensor:
        """(N,) bool: which images get transform ``name`` (probability p * strength; one draw per image always,
        so the random stream does not depend on p)."""
        return _rand((n,), g, like.float()) < float(self.p) * self.strength[name]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, c, h, w = x.shape
        g = generator
        m = self._chosen("xflip", n, g, x).view(n, 1, 1, 1)
        x = torch.where(m, x.flip(3), x)
        if h == w:
            m = self._chosen("rotate90", n, g, x)
            k = torch.where(m, _randint(4, (n,), g, x.device), torch.zeros_like(m, dtype=torch.long))
            out = x
            for r in (1, 2, 3):
                out = torch.where((k == r).view(n, 1, 1, 1), torch.rot90(x, r, dims=(2, 3)), out)
            x = out
        m = self._chosen("xint", n, g, x)
        t = ((_rand((n, 2), g, x.float()) * 2 - 1) * self.xint_max)
        dy = torch.where(m, (t[:, 0] * h).round().long(), torch.zeros_like(m, dtype=torch.long))
        dx = torch.where(m, (t[:, 1] * w).round().long(), torch.zeros_like(m, dtype=torch.long))
        x = shift_gather(x, dy, dx, "reflect")
        m = self._chosen("brightness", n, g, x).view(n, 1, 1, 1)
        x = x + torch.where(m, _randn((n, 1, 1, 1), g, x) * self.brightness_std, torch.zeros((), dtype=x.dtype, device=x.device))
        m = self._chosen("contrast", n, g, x).view(n, 1, 1, 1)
        x = x * torch.where(m, torch.exp2(_randn((n, 1, 1, 1), g, x) * self.contrast_std), torch.ones((), dtype=x.dtype, device=x.device))
        m = self._chosen("saturation", n, g, x).view(n, 1, 1, 1)
        s = torch.where(m, torch.exp2(_randn((n, 1, 1, 1), g, x) * self.saturation_std), torch.ones((), dtype=x.dtype, device=x.device))
        if c > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = mean + (x - mean) * s
        return x


class AdaController:
    """ADA's adjustment of p (no Lightning). Call :meth:`accumulate` with D's raw scores on the (augmented) reals
    every D step, and :meth:`update` every ``interval`` D steps with the number of real images seen since the last
    update (over all processes; in DDP all-reduce :attr:`stats` first). r_t = mean sign(D(real)) over those;
    p <- clip(p + sign(r_t - target) * images / speed_images, 0, 1)."""

    def __init__(self, target: float = 0.6, interval: int = 4, speed_images: int = 500_000, p: float = 0.0):
        if not 0 < target < 1:
            raise ConfigError(f"ada_target={target} must be in (0, 1) (0.6 in the ADA paper).")
        if interval < 1 or speed_images < 1:
            raise ConfigError(f"ada_interval={interval} and ada_speed_images={speed_images} must be >= 1 "
                              "(4 minibatches and 500000 images in the paper).")
        self.target, self.interval, self.speed_images = float(target), int(interval), int(speed_images)
        self.p = float(p)
        self.stats = torch.zeros(2, dtype=torch.float64)  # sum of sign(D(real)), count
        self.rt: float | None = None

    def accumulate(self, d_real: Tensor) -> None:
        d = d_real.detach().flatten()
        self.stats += torch.stack([d.sign().sum().double().cpu(), torch.tensor(float(d.numel()), dtype=torch.float64)])

    def due(self, d_step: int) -> bool:
        """True after every ``interval``-th D step (d_step counts from 0)."""
        return (d_step + 1) % self.interval == 0

    def update(self, images: int) -> float:
        """Move p; return the new p. ``images``: real images seen since the last update."""
        if self.stats[1] > 0:
            self.rt = float(self.stats[0] / self.stats[1])
            adjust = math.copysign(1.0, self.rt - self.target) if self.rt != self.target else 0.0
            self.p = min(max(self.p + adjust * images / self.speed_images, 0.0), 1.0)
        self.stats.zero_()
        return self.p

    def state_dict(self) -> dict:
        return {"p": self.p, "rt": self.rt, "target": self.target, "stats": self.stats.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.rt = float(state["p"]), state.get("rt")
        self.stats = torch.tensor(state.get("stats", [0.0, 0.0]), dtype=torch.float64)
