"""Paths through latent spaces: spherical interpolation (what Gaussian latents want, White 2016).

Used by ``gencli sample mode=interpolate`` (a strip of images per latent pair) and by perceptual path
length (``gencli eval metric=ppl``: each pair at its own t, Karras et al. 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor


def slerp_rows(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Row i slerped from a[i] to b[i] (flattened) at t[i]; linear where the two are (anti)parallel."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    so = torch.sin(omega)
    t = t.reshape(-1, 1).to(af)
    linear = (1 - t) * af + t * bf
    spherical = (torch.sin((1 - t) * omega) * af + torch.sin(t * omega) * bf) / so.clamp_min(1e-12)
    return torch.where(so.abs() < 1e-6, linear, spherical).reshape(a.shape)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Every pair (a[i], b[i]) at every t[j]: shape (len(a), len(t), *a.shape[1:])."""
    n, k = len(a), len(t)
    rows = slerp_rows(a.repeat_interleave(k, 0), b.repeat_interleave(k, 0), t.to(a.device).repeat(n))
    return rows.reshape(n, k, *a.shape[1:])
