"""Exponential moving average of a net's weights, shared by the families that keep one (GAN, diffusion).

The EMA copy is a plain ``nn.Module`` attribute of the family (so its weights travel in the
checkpoint under their own prefix) that is never trained. The decay warms up as
min(decay, (1 + k) / (10 + k)) after k updates, so a short run is not stuck near the random initial
weights while a long one gets the full decay (e.g. DDPM's 0.9999). Buffers (BatchNorm running
statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gencli.errors import ConfigError


def check_decay(decay: float | None) -> float | None:
    if decay is None or decay == 0:
        return None
    if not 0 < decay < 1:
        raise ConfigError(f"model.ema_decay={decay} must be in [0, 1) (e.g. 0.999), or null to keep no EMA copy.")
    return float(decay)


def ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` to average into."""
    return copy.deepcopy(net).requires_grad_(False)


def warmed_up_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float, updates: int, skipped: torch.Tensor | None = None) -> float:
    """Move ``ema`` toward ``net`` (after ``updates`` earlier updates); returns the decay used.

    ``skipped``: the optimiser's ``found_inf`` flag (a 0-d float tensor on the device, 1 when the step just taken
    was skipped there because it was non-finite: see callbacks.non_finite): then the EMA stays where it was too,
    decided on the device without a sync."""
    d = warmed_up_decay(decay, updates)
    targets = [p.detach() for p in net.parameters()]
    if skipped is None:
        torch._foreach_lerp_(list(ema.parameters()), targets, 1.0 - d)
    else:
        weight = (1.0 - skipped.to(targets[0].dtype)) * (1.0 - d)
        torch._foreach_lerp_(list(ema.parameters()), targets, [weight] * len(targets))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
    return d


def skipped_flag(optimizer) -> torch.Tensor | None:
    """The ``found_inf`` flag the optimiser's last step was given (torch's fused optimisers skip a step on the device
    when it is 1; the NonFiniteGuard sets it under ``hardware.host_sync=log``), or None. A LightningOptimizer is
    looked through to the optimiser it wraps."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    flag = getattr(optimizer, "found_inf", None)
    return flag if isinstance(flag, torch.Tensor) else None


def pick_weights(raw: nn.Module, ema: nn.Module | None, use_ema: bool | None, what: str) -> nn.Module:
    """The net that samples: the EMA copy by default when there is one, the raw net with use_ema=false;
    ``what`` names the family's EMA net in the error for use_ema=true without one."""
    if use_ema is None:
        use_ema = ema is not None
    if use_ema and ema is None:
        raise ConfigError(f"use_ema=true, but this model keeps no {what} (it was trained with model.ema_decay=null). "
                          "Drop use_ema= or use use_ema=false.")
    return ema if use_ema else raw
