"""Samplers: turn a trained denoiser into images, chosen at sample time (``sampler=ddpm|ddim``).

A sampler knows nothing about networks: it calls ``denoise(x_t, t, clip) -> (x0_hat, eps_hat)`` (the
family converts its network's eps / v / x0 output with the :class:`NoiseSchedule`) and walks a
decreasing sequence of timesteps from x_T ~ N(0, I) to x_0.

- :class:`DDPMSampler`: ancestral sampling (Ho et al. 2020, alg. 2): x_{t-1} ~ N(mu(x0_hat, x_t), sigma_t^2)
  with sigma^2 = beta_tilde_t (``variance=beta_tilde``, the true posterior's) or beta_t
  (``variance=beta``, the paper's choice for CIFAR-10). ``steps`` < T respaces the chain as in
  Nichol & Dhariwal 2021 (beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}).
- :class:`DDIMSampler`: Song et al. 2021, eq. 12:
  x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev). eta = 0 is deterministic
  (x_T -> x_0 is a fixed map, so interpolating x_T interpolates images); eta = 1 over all T steps is
  DDPM with beta_tilde.

Timestep spacing for ``steps`` < T (Lin et al. 2024, table 2), for T = 1000 and 10 steps:
``leading`` 900, 800, ..., 0 (DDIM paper, diffusers' default); ``trailing`` 999, 899, ..., 99
(starts from pure noise: better with few steps, hence the default); ``linspace`` 999, 888, ..., 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError
from gencli.progress import track_steps
from gencli.seeds import SampleGenerator
from gencli.seeds import randn as draw_randn

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("beta_tilde", "beta")

#: ``denoise(x_t, t, clip)`` -> (x0_hat, eps_hat); t is a (N,) long tensor.
Denoiser = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]


def spaced_timesteps(timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """``steps`` timesteps out of 0..T-1, in decreasing order (the order they are visited)."""
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not known; use one of {', '.join(SPACINGS)}.")
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"sampler.steps={steps} must be between 1 and the model's {timesteps} training timesteps.")
    if spacing == "leading":
        ts = [i * (timesteps // steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(timesteps - i * timesteps / steps) - 1 for i in range(steps)]
    else:
        ts = [round(i * (timesteps - 1) / (steps - 1)) for i in range(steps)] if steps > 1 else [timesteps - 1]
    return sorted(set(ts), reverse=True)


def randn(shape: tuple[int, ...], like: Tensor, generator: SampleGenerator) -> Tensor:
    """Noise drawn on the generator's device (CPU for gencli's jobs) then moved: same seed, same images anywhere.

    A :class:`gencli.seeds.PerImageGenerator` draws row i from image i's own stream, so each image's
    per-step noise (DDPM, DDIM with eta > 0) does not depend on which images share its batch."""
    return draw_randn(shape, generator, device=like.device, dtype=like.dtype)


class Sampler:
    """Base class: walk :meth:`timesteps` from x_T to x_0."""

    name = "sampler"
    #: True when x_T determines x_0 (no noise is added along the way).
    deterministic = False

    def __init__(self, steps: int | None = None, spacing: str = "trailing", clip_denoised: bool = True):
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"sampler.steps={steps} must be a positive integer (or null for all training timesteps).")
        if spacing not in SPACINGS:
            raise ConfigError(f"sampler.spacing={spacing!r} is not known; use one of {', '.join(SPACINGS)}.")
        self.steps = None if steps is None else int(steps)
        self.spacing = spacing
        self.clip_denoised = bool(clip_denoised)

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        return spaced_timesteps(schedule.timesteps, self.steps or schedule.timesteps, self.spacing)

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.steps, "spacing": self.spacing, "clip_denoised": self.clip_denoised}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.describe().items() if k != 'name')})"

    @torch.no_grad()
    def sample(self, denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor,
               generator: SampleGenerator = None) -> Tensor:
        x = x_T
        ts = self.timesteps(schedule)
        alpha_bar = schedule.alphas_cumprod
        for i in track_steps(range(len(ts)), len(ts), f"{self.name} steps"):
            t, prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
            a_t = float(alpha_bar[t])
            a_prev = float(alpha_bar[prev]) if prev >= 0 else 1.0
            x0, eps = denoise(x, torch.full((len(x),), t, device=x.device, dtype=torch.long), self.clip_denoised)
            x = self.step(x, x0, eps, a_t, a_prev, generator)
        return x

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_prev: float,
             generator: SampleGenerator) -> Tensor:
        raise NotImplementedError


class DDPMSampler(Sampler):
    name = "ddpm"

    def __init__(self, steps: int | None = None, variance: str = "beta_tilde", spacing: str = "trailing",
                 clip_denoised: bool = True):
        super().__init__(steps=steps, spacing=spacing, clip_denoised=clip_denoised)
        if variance not in VARIANCES:
            raise ConfigError(f"sampler.variance={variance!r} is not known; use beta_tilde (the posterior's) or beta.")
        self.variance = variance

    def describe(self) -> dict:
        return {**super().describe(), "variance": self.variance}

    def step(self, x, x0, eps, a_t, a_prev, generator):
        beta = 1.0 - a_t / a_prev  # the (respaced) beta of this step; beta_t itself when no step is skipped
        coef_x0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
        mean = coef_x0 * x0 + coef_xt * x
        if a_prev >= 1.0:  # the last step returns the mean (Ho et al.: no noise at t = 1)
            return mean
        var = beta * (1.0 - a_prev) / (1.0 - a_t) if self.variance == "beta_tilde" else beta
        return mean + math.sqrt(var) * randn(tuple(x.shape), x, generator)


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, steps: int | None = 50, eta: float = 0.0, spacing: str = "trailing", clip_denoised: bool = True):
        super().__init__(steps=steps, spacing=spacing, clip_denoised=clip_denoised)
        if not 0.0 <= float(eta) <= 1.0:
            raise ConfigError(f"sampler.eta={eta} must be in [0, 1]: 0 is deterministic DDIM, 1 matches DDPM's noise.")
        self.eta = float(eta)

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return self.eta == 0.0

    def describe(self) -> dict:
        return {**super().describe(), "eta": self.eta}

    def sigma(self, a_t: float, a_prev: float) -> float:
        return self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(max(0.0, 1.0 - a_t / a_prev))

    def step(self, x, x0, eps, a_t, a_prev, generator):
        sigma = self.sigma(a_t, a_prev)
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1.0 - a_prev - sigma**2)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(tuple(x.shape), x, generator)
        return x_prev
