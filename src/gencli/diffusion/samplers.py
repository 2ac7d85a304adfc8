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

Fast solvers of the probability-flow ODE (deterministic; good samples in 10-20 network evaluations):

- :class:`DPMSolverPP2M`: DPM-Solver++(2M), Lu et al. 2022 (alg. 2), in data (x0) prediction: a
  first-order step, then second-order multistep updates using the previous step's x0 estimate, and a
  last step to sigma = 0 that returns the x0 estimate (diffusers' ``DPMSolverMultistepScheduler`` with
  ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``). One network
  evaluation per step.
- :class:`HeunSampler`: Karras et al. 2022, alg. 1 without churn: Euler steps in
  sigma = sqrt((1 - alpha_bar) / alpha_bar) with Heun's second-order correction, except on the last
  step to sigma = 0 (diffusers' ``HeunDiscreteScheduler``). 2 * steps - 1 network evaluations.

Both take ``sigmas=discrete`` (the spaced training timesteps' own noise levels) or ``sigmas=karras``
(Karras et al.'s rho = 7 spacing between the schedule's smallest and largest sigma; the network then
sees fractional timesteps, whose alpha_bar comes from log-sigma interpolation, see
:meth:`NoiseSchedule.t_of_sigma`). tests/unit/test_fast_samplers.py checks them step by step against
diffusers.

Every sampler can start part-way (``start``: SDEdit variations, :mod:`gencli.diffusion.editing`) and
calls ``after_step(x, alpha_bar_next)`` after each step with x in the variance-preserving space of
x_t (inpainting by replacement pastes the known pixels there).
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
SIGMA_SPACINGS = ("discrete", "karras")
#: Karras et al. 2022's rho: sigmas evenly spaced in sigma^(1/rho).
KARRAS_RHO = 7.0
VARIANCES = ("beta_tilde", "beta")

#: ``denoise(x_t, t, clip)`` -> (x0_hat, eps_hat); t is a (N,) tensor of timesteps: long, or float64 where a
#: solver steps between the training timesteps.
Denoiser = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]
#: ``after_step(x, alpha_bar_next) -> x``, called after every step with x in x_t's (variance-preserving) space.
AfterStep = Callable[[Tensor, float], Tensor]


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
    per-step noise (DDPM, DDIM with eta > 0) does not depend on which images share its batch. For a GPU the
    CPU draw goes through pinned memory and is copied without blocking: the host draws the next step's noise
    while the GPU still runs this one (a pageable copy would wait for it)."""
    on_cpu = generator is not None and generator.device.type == "cpu"
    if not (on_cpu and like.device.type == "cuda"):
        return draw_randn(shape, generator, device=like.device, dtype=like.dtype)
    noise = draw_randn(shape, generator, device="cpu", dtype=like.dtype)
    return noise.pin_memory().to(like.device, non_blocking=True)


class Sampler:
    """Base class: walk :meth:`timesteps` from x_T to x_0."""

    name = "sampler"
    #: True when x_T determines x_0 (no noise is added along the way).
    deterministic = False
    #: True when each step depends only on the current x (DDPM, DDIM): RePaint can then step back up.
    markov = True

    def __init__(self, steps: int | None = None, spacing: str = "trailing", clip_denoised: bool = True):
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"sampler.steps={steps} must be a positive integer (or null for all training timesteps).")
        if spacing not in SPACINGS:
            raise ConfigError(f"sampler.spacing={spacing!r} is not known; use one of {', '.join(SPACINGS)}.")
        self.steps = None if steps is None else int(steps)
        self.spacing = spacing
        self.clip_denoised = bool(clip_denoised)

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The spaced training timesteps, in the order they are visited."""
        return spaced_timesteps(schedule.timesteps, self.steps or schedule.timesteps, self.spacing)

    def levels(self, schedule: NoiseSchedule) -> list[float]:
        """The timesteps the network is evaluated at, one per step (fractional for Karras sigmas)."""
        return [float(t) for t in self.timesteps(schedule)]

    def nfe(self, schedule: NoiseSchedule, start: int = 0) -> int:
        """Network evaluations of one sampling pass (from step ``start``)."""
        return len(self.levels(schedule)) - start

    def start_for(self, schedule: NoiseSchedule, strength: float) -> int:
        """The step a variation of strength s starts from: the last round(s * steps) steps are walked (at least
        one), as diffusers' img2img truncates its timesteps; s = 1 walks them all, from (near) pure noise."""
        n = len(self.levels(schedule))
        return n - max(1, min(n, round(float(strength) * n)))

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.steps, "spacing": self.spacing, "clip_denoised": self.clip_denoised}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.describe().items() if k != 'name')})"

    @staticmethod
    def t_tensor(level: float, like: Tensor) -> Tensor:
        """A batch of one timestep: long when it is a training timestep, float64 between them."""
        if float(level).is_integer():
            return torch.full((len(like),), int(level), device=like.device, dtype=torch.long)
        return torch.full((len(like),), float(level), device=like.device, dtype=torch.float64)

    @torch.no_grad()
    def sample(self, denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, generator: SampleGenerator = None,
               start: int = 0, after_step: AfterStep | None = None) -> Tensor:
        """Walk the steps from ``start`` (x_T is then x at ``levels()[start]``) down to x_0."""
        x = x_T
        ts = self.timesteps(schedule)
        alpha_bar = schedule.alphas_cumprod_list  # Python floats: no step reads a tensor back
        for i in track_steps(range(start, len(ts)), len(ts) - start, f"{self.name} steps"):
            t, prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
            a_t = alpha_bar[t]
            a_prev = alpha_bar[prev] if prev >= 0 else 1.0
            x0, eps = denoise(x, self.t_tensor(t, x), self.clip_denoised)
            x = self.step(x, x0, eps, a_t, a_prev, generator)
            if after_step is not None:
                x = after_step(x, a_prev)
        return x

    def step(self, x: Tensor, x0: Tensor, eps: Tensor, a_t: float, a_prev: float,
             generator: SampleGenerator) -> Tensor:
        """One Markov step from alpha_bar a_t to a_prev (DDPM, DDIM); what RePaint's resampling needs."""
        raise NotImplementedError(f"{self.name} is a multistep solver: it has no single Markov step")


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


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> list[float]:
    """Karras et al. 2022, eq. 5: ``steps`` sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    if steps == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]


class ODESolver(Sampler):
    """Shared parts of the deterministic probability-flow ODE solvers: levels from spaced timesteps or Karras sigmas."""

    deterministic = True
    markov = False

    def __init__(self, steps: int | None = 20, spacing: str = "trailing", sigmas: str = "discrete",
                 clip_denoised: bool = True):
        super().__init__(steps=steps, spacing=spacing, clip_denoised=clip_denoised)
        if sigmas not in SIGMA_SPACINGS:
            raise ConfigError(f"sampler.sigmas={sigmas!r} is not known; use discrete (the spaced training timesteps' "
                              "noise levels) or karras (Karras et al. 2022's rho = 7 spacing).")
        self.sigmas = sigmas

    def describe(self) -> dict:
        return {**super().describe(), "sigmas": self.sigmas}

    def levels(self, schedule: NoiseSchedule) -> list[float]:
        if self.sigmas == "discrete":
            return super().levels(schedule)
        n = len(self.timesteps(schedule))
        sigma_min, sigma_max = schedule.sigmas[[0, -1]].tolist()
        sigmas = karras_sigmas(sigma_min, sigma_max, n)
        return [schedule.t_of_sigma(sig) for sig in sigmas]

    def level_sigmas(self, schedule: NoiseSchedule) -> list[float]:
        """sigma of each level, then 0 (the solvers end on the data): Python floats, computed once per pass."""
        return schedule.sigmas_at(self.levels(schedule)) + [0.0]


class DPMSolverPP2M(ODESolver):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in log-SNR, data prediction."""

    name = "dpmpp_2m"

    @torch.no_grad()
    def sample(self, denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, generator: SampleGenerator = None,
               start: int = 0, after_step: AfterStep | None = None) -> Tensor:
        levels, sigmas = self.levels(schedule), self.level_sigmas(schedule)
        x, prev_x0, prev_lambda = x_T, None, None
        for i in track_steps(range(start, len(levels)), len(levels) - start, f"{self.name} steps"):
            x0, _ = denoise(x, self.t_tensor(levels[i], x), self.clip_denoised)
            alpha_s, sigma_s = alpha_sigma(sigmas[i])
            lambda_s = math.log(alpha_s) - math.log(sigma_s)
            if sigmas[i + 1] == 0.0:
                x = x0  # the step to sigma = 0 is first order and lands on the x0 estimate
            else:
                x = self.update(x, x0, sigmas[i + 1], sigma_s, lambda_s, prev_x0, prev_lambda)
            prev_x0, prev_lambda = x0, lambda_s
            if after_step is not None:
                x = after_step(x, 1.0 / (1.0 + sigmas[i + 1] ** 2))
        return x

    @staticmethod
    def update(x: Tensor, x0: Tensor, sigma_next: float, sigma_s: float, lambda_s: float,
               prev_x0: Tensor | None, prev_lambda: float | None) -> Tensor:
        """Lu et al. 2022, eqs. for DPM-Solver++(1) and (2M), in (alpha_t, sigma_t) = (1, sigma) / sqrt(1 + sigma^2)."""
        alpha_t, sigma_t = alpha_sigma(sigma_next)
        lambda_t = math.log(alpha_t) - math.log(sigma_t)
        h = lambda_t - lambda_s
        phi = alpha_t * (math.exp(-h) - 1.0)
        x = (sigma_t / sigma_s) * x - phi * x0
        if prev_x0 is not None:
            r0 = (lambda_s - prev_lambda) / h
            x = x - 0.5 * phi * (1.0 / r0) * (x0 - prev_x0)
        return x


class HeunSampler(ODESolver):
    """Heun's second-order method on the probability-flow ODE in sigma (Karras et al. 2022, alg. 1, no churn)."""

    name = "heun"

    def __init__(self, steps: int | None = 10, spacing: str = "trailing", sigmas: str = "discrete",
                 clip_denoised: bool = True):
        super().__init__(steps=steps, spacing=spacing, sigmas=sigmas, clip_denoised=clip_denoised)

    def nfe(self, schedule: NoiseSchedule, start: int = 0) -> int:
        return 2 * (len(self.levels(schedule)) - start) - 1

    @torch.no_grad()
    def sample(self, denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, generator: SampleGenerator = None,
               start: int = 0, after_step: AfterStep | None = None) -> Tensor:
        levels, sigmas = self.levels(schedule), self.level_sigmas(schedule)

        def x0_at(x: Tensor, i: int) -> Tensor:  # x in sigma space: x_t = x / sqrt(1 + sigma^2)
            return denoise(x / math.sqrt(1.0 + sigmas[i] ** 2), self.t_tensor(levels[i], x), self.clip_denoised)[0]

        x = x_T * math.sqrt(1.0 + sigmas[start] ** 2)
        for i in track_steps(range(start, len(levels)), len(levels) - start, f"{self.name} steps"):
            x = self.step_pair(x, x0_at, i, sigmas[i], sigmas[i + 1])
            if after_step is not None:
                scale = math.sqrt(1.0 + sigmas[i + 1] ** 2)
                x = after_step(x / scale, 1.0 / scale**2) * scale
        return x

    @staticmethod
    def step_pair(x: Tensor, x0_at: Callable[[Tensor, int], Tensor], i: int, sigma: float, sigma_next: float) -> Tensor:
        """One Euler step from sigma to sigma_next, corrected by the slope at its end unless sigma_next = 0."""
        d = (x - x0_at(x, i)) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0.0:
            return x_euler
        d_next = (x_euler - x0_at(x_euler, i + 1)) / sigma_next
        return x + 0.5 * (d + d_next) * (sigma_next - sigma)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the noise level sigma = sigma_t / alpha_t."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha
