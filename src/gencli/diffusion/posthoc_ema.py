"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
section 3 and appendix C; NVlabs/edm2 ``training/phema.py``): choose the EMA length after training.

**Power-function EMA.** After t training steps the average weighs the net's weights at step tau <= t by a power of
tau, p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1): the profile keeps the same shape as t grows, so its width is a
fixed fraction of training: its standard deviation relative to t (the profile's std over tau / t),

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))          (eq. 123; 0.05 <-> gamma = 16.97,
                                                                           0.10 <-> gamma = 6.94)

inverted by the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0
(eq. 126, alg. 2). It is tracked step by step as theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1) (eq. 127; t counts optimiser steps from 1, so beta_1 = 0 and no warm-up is needed).

**Reconstruction.** Snapshots of two such profiles (EDM2: sigma_rel 0.05 and 0.10) every N steps span a space of
averaging profiles; any other profile (any sigma_rel, at any snapshot's step) is approximated in it by least squares
in L2 over tau: with the inner products <p_a, p_b> of two power profiles in closed form (eq. 151, alg. 3), the
coefficients solve A x = b, A_ij = <p_i, p_j> between snapshots, b_i = <p_i, p_target>, normalised to sum to 1;
the reconstructed weights are sum_i x_i theta_hat_i. :class:`PowerFunctionEMA` tracks the profiles,
:meth:`PowerFunctionEMA.snapshot` takes snapshots, :func:`reconstruct` combines them and
:func:`thin_snapshots` keeps their number bounded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gencli.diffusion.schedule import ConfigError

#: EDM2's two tracked profiles
SIGMA_RELS = (0.05, 0.10)
#: sigma_rel of the flattest power profile (gamma -> 0, a uniform average): the largest that exists
MAX_SIGMA_REL = math.sqrt(1 / 12)


def check_sigma_rel(sigma_rel: Any, key: str = "ema.sigma_rel") -> float:
    try:
        v = float(sigma_rel)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0 < v < MAX_SIGMA_REL:
        raise ConfigError(f"{key}={sigma_rel!r} must be in (0, {MAX_SIGMA_REL:.4f}): the EMA length as a fraction of "
                          "training (EDM2 tracks 0.05 and 0.10 and finds its best FIDs between about 0.05 and 0.15).")
    return v


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """EDM2 eq. 123."""
    g = np.float64(gamma)
    return np.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """EDM2 eq. 126 / alg. 2: the largest real root of gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2)."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    out = np.array([np.roots([1, 7, 16 - v, 12 - v]).real.max() for v in s.flatten() ** -2.0]).reshape(s.shape)
    return float(out) if out.ndim == 0 else out


def power_beta(gamma: float, step: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) for the update that takes in step t's weights (t >= 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(a_steps, a_sigma_rels, b_steps, b_sigma_rels) -> np.ndarray:
    """<p_a, p_b> = integral over tau of two power profiles (eq. 151, alg. 3), broadcast over the arguments."""
    a_t, b_t = np.float64(a_steps), np.float64(b_steps)
    a_g, b_g = sigma_rel_to_gamma(np.float64(a_sigma_rels)), sigma_rel_to_gamma(np.float64(b_sigma_rels))
    ratio = a_t / b_t
    exp = np.where(a_t < b_t, b_g, -a_g)
    return (a_g + 1) * (b_g + 1) * ratio**exp / ((a_g + b_g + 1) * np.maximum(a_t, b_t))


def solve_coefficients(in_steps: Sequence[float], in_sigma_rels: Sequence[float], out_step: float,
                       out_sigma_rels: Sequence[float] | float) -> np.ndarray:
    """Least-squares weights (n_in, n_out) of the input snapshots for each output profile, each column summing to 1."""
    in_t, in_s = np.broadcast_arrays(np.float64(in_steps), np.float64(in_sigma_rels))
    out_t, out_s = np.broadcast_arrays(np.float64(out_step), np.atleast_1d(np.float64(out_sigma_rels)))
    col = lambda x: x.reshape(-1, 1)  # noqa: E731
    row = lambda x: x.reshape(1, -1)  # noqa: E731
    A = profile_inner_products(col(in_t), col(in_s), row(in_t), row(in_s))
    B = profile_inner_products(col(in_t), col(in_s), row(out_t), row(out_s))
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0)


class PowerFunctionEMA(nn.Module):
    """Power-function EMA copies of a net, one per ``sigma_rels`` profile (submodules ``emas.0``, ``emas.1``, ... so
    they travel in the checkpoint), and the number of updates taken (buffer ``steps``)."""

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float] = SIGMA_RELS):
        super().__init__()
        rels = [check_sigma_rel(s, "ema.sigma_rels") for s in sigma_rels]
        if not rels or len(set(rels)) != len(rels):
            raise ConfigError(f"ema.sigma_rels={list(sigma_rels)} must list distinct profile widths (EDM2: [0.05, 0.1]); "
                              "two or more let any other width be reconstructed after training.")
        self.sigma_rels = rels
        self.gammas = [float(sigma_rel_to_gamma(s)) for s in rels]
        self.emas = nn.ModuleList(copy.deepcopy(net).requires_grad_(False) for _ in rels)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, net: nn.Module, step: int | None = None) -> None:
        """Take in ``net``'s weights after optimiser step ``step`` (1, 2, ...; default: one more than the last)."""
        t = int(self.steps) + 1 if step is None else int(step)
        if t < 1:
            raise ValueError(f"power-function EMA steps count from 1, got {t}")
        params = [p.detach() for p in net.parameters()]
        for gamma, ema in zip(self.gammas, self.emas):
            torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - power_beta(gamma, t))
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)
        self.steps.fill_(t)

    def snapshot(self) -> list[dict[str, Any]]:
        """One record per profile: {step, sigma_rel, state (CPU copy of its state_dict), params (parameter names)}."""
        step = int(self.steps)
        if step < 1:
            raise ValueError("a power-function EMA snapshot needs at least one update")
        return [{"step": step, "sigma_rel": rel, "state": {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()},
                 "params": [name for name, _ in ema.named_parameters()]}
                for rel, ema in zip(self.sigma_rels, self.emas)]


def reconstruct(snapshots: Iterable[dict[str, Any]], sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The state dict of a power-function EMA of width ``sigma_rel`` at ``step`` (default: the last snapshot's), as
    the least-squares combination of the snapshots taken up to then. Parameters are combined (in float64, then cast
    back); buffers come from a snapshot at ``step``, as EDM2 does."""
    target = check_sigma_rel(sigma_rel)
    snaps = sorted(snapshots, key=lambda s: (s["step"], s["sigma_rel"]))
    if not snaps:
        raise ConfigError("no post-hoc EMA snapshots to reconstruct from: train with ema.snapshot_every set.")
    steps_taken = sorted({s["step"] for s in snaps})
    step = steps_taken[-1] if step is None else int(step)
    if step not in steps_taken:
        raise ConfigError(f"ema.step={step} is not a step with a snapshot; choose one of {steps_taken[:5]}"
                          f"{' ...' if len(steps_taken) > 5 else ''} {steps_taken[-1]} (the last, by default).")
    used = [s for s in snaps if 0 < s["step"] <= step]
    coefs = solve_coefficients([s["step"] for s in used], [s["sigma_rel"] for s in used], step, [target])[:, 0]
    last = next(s for s in reversed(used) if s["step"] == step)
    params = set(last["params"])
    out: dict[str, Tensor] = {}
    for name, value in last["state"].items():
        if name in params:
            total = sum(float(c) * s["state"][name].to(torch.float64) for c, s in zip(coefs, used))
            out[name] = total.to(value.dtype)
        else:
            out[name] = value.clone()
    return out


def thin_snapshots(steps: Sequence[int], max_count: int) -> list[int]:
    """The snapshot steps to keep so that at most ``max_count`` remain: the spacing is doubled (keeping steps that are
    multiples of it) until they fit, and the newest is always kept; what is dropped is evenly spread over training."""
    if int(max_count) < 2:
        raise ConfigError(f"ema.max_snapshots={max_count} must be >= 2 (per profile) for a reconstruction to have a "
                          "choice; EDM2 keeps one every 8M images (about 250 for a full run).")
    kept = sorted(set(int(s) for s in steps))
    if len(kept) <= max_count:
        return kept
    newest = kept[-1]
    interval = math.gcd(*kept) if len(kept) > 1 else newest
    while len(kept) > max_count:
        interval *= 2
        kept = sorted({s for s in steps if s % interval == 0} | {newest})
    return kept
