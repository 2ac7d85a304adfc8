"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"; NVlabs/edm).

The process is variance-exploding and continuous: x = x_0 + sigma n, n ~ N(0, I), sigma > 0 any real number.
A network F is turned into a denoiser D(x; sigma) ~ E[x_0 | x] by the preconditioning of the paper's table 1:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)       c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)               c_noise = ln(sigma) / 4

so F's input and its training target both have unit variance at every sigma (sigma_data: the data's standard
deviation, 0.5 for images in [-1, 1]). Training (:class:`EDMLoss`) draws ln sigma ~ N(P_mean, P_std^2) and weights
||D - x_0||^2 by lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, which makes the loss
||F - F_target||^2 with unit weight. Sampling (:class:`EDMSampler`) is the paper's algorithm 2: Heun's method on
the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma over sigmas spaced evenly in sigma^(1/rho)
(:func:`edm_sigmas`), with optional "churn": before each step noise is added to raise sigma to
sigma_hat = (1 + gamma) sigma, gamma = min(S_churn / steps, sqrt(2) - 1) where S_min <= sigma <= S_max, the noise
scaled by S_noise. S_churn = 0 is the deterministic sampler (the paper's CIFAR-10 setting, 18 steps = 35 NFE).

gencli's nets take (x, t, labels?) with t a (N,) tensor: c_noise takes t's place (:class:`EDMPreconditioning`).
:func:`vp_denoiser` lets the samplers of :mod:`gencli.diffusion.samplers` (DDIM, DPM-Solver++, Heun), which walk a
:class:`NoiseSchedule` in the variance-preserving x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps, use an EDM
denoiser: x_t / sqrt(alpha_bar) = x_0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar).

Checked step by step in float64 against a transcription of NVlabs/edm's ``EDMPrecond``, ``EDMLoss`` and
``edm_sampler`` (tests/unit/test_edm.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gencli.diffusion.samplers import Denoiser, randn
from gencli.diffusion.schedule import ConfigError, NoiseSchedule

#: The paper's values (table 1 and section 5; CIFAR-10 / FFHQ / AFHQ settings).
SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
P_MEAN = -1.2
P_STD = 1.2

#: ``denoise(x, sigma, clip) -> x0_hat``: x = x_0 + sigma n (VE space), sigma a (N,) tensor in x's dtype.
EDMDenoiser = Callable[[Tensor, Tensor, bool], Tensor]
#: ``after_step(x, sigma_next) -> x``, called after every step (x in VE space; sigma_next = 0 after the last).
EDMAfterStep = Callable[[Tensor, float], Tensor]
#: ``callback(info)`` after every step: keys i, steps, sigma, sigma_hat, sigma_next, x, denoised, nfe.
StepCallback = Callable[[dict[str, Any]], None]


def _positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{name}={value!r} must be a finite number > 0.")
    return v


def sigma_column(sigma: Tensor | float, like: Tensor) -> Tensor:
    """sigma (a number, a 0-d tensor or one per sample) as an (N, 1, ..., 1) tensor in ``like``'s dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(len(like))
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


class EDMPreconditioning(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around any net F(x, t, labels?) (the paper's table 1).

    ``c_noise_scale`` multiplies the paper's c_noise = ln(sigma) / 4 before it reaches F as t (1: the paper's; F's
    timestep embedding then sees values in about [-1.6, 1.1] for sigma in [0.002, 80]). ``sigma_min``/``sigma_max``
    are the noise levels the model supports (EDM's ``EDMPrecond`` fields; the sampler clips its range to them).
    The wrapped net is the ``net`` attribute, so its weights keep their own names under ``net.``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0,
                 sigma_max: float = float("inf"), c_noise_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.sigma_data = _positive("model.sigma_data", sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        if not 0 <= self.sigma_min < self.sigma_max:
            raise ConfigError(f"model.sigma_min={sigma_min} and model.sigma_max={sigma_max}: need 0 <= sigma_min < "
                              "sigma_max (EDM: 0.002 and 80).")
        self.c_noise_scale = _positive("model.c_noise_scale", c_noise_scale)
        #: gencli's families read the class count off the net
        self.num_classes = getattr(net, "num_classes", 0)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (any shape; c_noise scaled by ``c_noise_scale``)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4 * self.c_noise_scale
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        sigma = sigma_column(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        t = c_noise.flatten()
        out = self.net(c_in * x, t) if labels is None else self.net(c_in * x, t, labels)
        return c_skip * x + c_out * out.to(x.dtype)

    def raw_target(self, x0: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        """What F must output for D(x; sigma) = x0: (x0 - c_skip x) / c_out (unit variance, table 1)."""
        sigma = sigma_column(sigma, x)
        c_skip, c_out, _, _ = self.coefficients(sigma)
        return (x0 - c_skip * x) / c_out

    def describe(self) -> dict:
        return {"sigma_data": self.sigma_data, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "c_noise": f"ln(sigma) / 4 * {self.c_noise_scale:g}"}


def _draw(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


class EDMLoss:
    """The paper's training loss: ln sigma ~ N(P_mean, P_std^2), y = x_0 + sigma n, loss lambda(sigma) ||D(y; sigma)
    - x_0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    Returned per sample as the mean over dimensions (NVlabs/edm returns it per element and sums; the factor is a
    constant, which Adam does not see), with the sigmas drawn, so the family can report losses by noise level.
    """

    def __init__(self, P_mean: float = P_MEAN, P_std: float = P_STD, sigma_data: float = SIGMA_DATA):
        self.P_mean = float(P_mean)
        self.P_std = _positive("model.P_std", P_std)
        self.sigma_data = _positive("model.sigma_data", sigma_data)

    def sample_sigmas(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """n training noise levels, log-normal (one per sample, shape (N,))."""
        return (_draw((n,), like, generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, denoiser: Callable[..., Tensor], x0: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None, sigma: Tensor | None = None,
                 noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(per-sample loss (N,), sigma (N,)); ``denoiser(x, sigma, labels?)`` is D, e.g. an EDMPreconditioning.
        ``sigma`` / ``noise`` (unit Gaussian) may be given; else drawn in that order from ``generator``."""
        if sigma is None:
            sigma = self.sample_sigmas(len(x0), x0, generator)
        if noise is None:
            noise = _draw(tuple(x0.shape), x0, generator)
        s = sigma_column(sigma, x0)
        y = x0 + s * noise
        d = denoiser(y, sigma) if labels is None else denoiser(y, sigma, labels)
        loss = self.weight(s) * (d - x0) ** 2
        return loss.flatten(1).mean(1), torch.as_tensor(sigma).to(x0).expand(len(x0))

    def describe(self) -> dict:
        return {"P_mean": self.P_mean, "P_std": self.P_std, "sigma_data": self.sigma_data,
                "weight": "(sigma^2 + sigma_data^2) / (sigma sigma_data)^2"}


def edm_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> list[float]:
    """The paper's eq. 5: ``steps`` noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho),
    then 0 (``steps + 1`` Python floats, computed in float64)."""
    if int(steps) != steps or int(steps) < 1:
        raise ConfigError(f"sampler.steps={steps} must be a positive integer (EDM uses 18 on CIFAR-10).")
    sigma_min, sigma_max = _positive("sampler.sigma_min", sigma_min), _positive("sampler.sigma_max", sigma_max)
    rho = _positive("sampler.rho", rho)
    if not sigma_min < sigma_max:
        raise ConfigError(f"sampler.sigma_min={sigma_min} must be below sampler.sigma_max={sigma_max} (EDM: 0.002, 80).")
    steps = int(steps)
    if steps == 1:
        return [sigma_max, 0.0]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


class EDMSampler:
    """The paper's algorithm 2 (NVlabs/edm ``edm_sampler``): Heun with churn over :func:`edm_sigmas`.

    ``steps`` noise levels give 2 * steps - 1 network evaluations (the last step, to sigma = 0, is Euler). Noise
    for churn is drawn only on steps that churn, through ``gencli.diffusion.samplers.randn`` (a
    ``PerImageGenerator`` gives each image its own stream; a ``torch.Generator`` or None work too).
    """

    name = "edm"
    markov = False  # no single Markov step: RePaint's walk back up does not apply; replacement does

    def __init__(self, steps: int = 18, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                 clip_denoised: bool = False):
        self.sigma_list = edm_sigmas(steps, sigma_min, sigma_max, rho)  # validates all four
        self.steps, self.sigma_min, self.sigma_max, self.rho = int(steps), float(sigma_min), float(sigma_max), float(rho)
        if not float(S_churn) >= 0:
            raise ConfigError(f"sampler.S_churn={S_churn} must be >= 0 (0: deterministic; EDM's ImageNet setting: 40).")
        if not 0 <= float(S_min) <= float(S_max):
            raise ConfigError(f"sampler.S_min={S_min}, sampler.S_max={S_max}: need 0 <= S_min <= S_max (the sigma range "
                              "where churn applies; EDM: 0 and inf, or 0.05 and 50).")
        self.S_churn, self.S_min, self.S_max = float(S_churn), float(S_min), float(S_max)
        self.S_noise = _positive("sampler.S_noise", S_noise)
        self.clip_denoised = bool(clip_denoised)
        self.last_nfe = 0  # network evaluations of the last pass, counted as they happen

    @property
    def deterministic(self) -> bool:
        return self.S_churn == 0.0

    def sigmas(self) -> list[float]:
        return list(self.sigma_list)

    def gammas(self) -> list[float]:
        """The churn of each step: min(S_churn / steps, sqrt(2) - 1) where S_min <= sigma <= S_max, else 0."""
        g = min(self.S_churn / self.steps, math.sqrt(2) - 1)
        return [g if self.S_min <= s <= self.S_max else 0.0 for s in self.sigma_list[:-1]]

    def nfe(self, start: int = 0) -> int:
        return 2 * (self.steps - start) - 1

    def start_for(self, strength: float) -> int:
        """The step a variation of strength s starts from: the last round(s * steps) steps are walked (at least one),
        as for the other samplers (``Sampler.start_for``)."""
        return self.steps - max(1, min(self.steps, round(float(strength) * self.steps)))

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho, "S_churn": self.S_churn, "S_min": self.S_min, "S_max": self.S_max,
                "S_noise": self.S_noise, "clip_denoised": self.clip_denoised}

    def __repr__(self) -> str:
        return f"EDMSampler({', '.join(f'{k}={v}' for k, v in self.describe().items() if k != 'name')})"

    @torch.no_grad()
    def sample(self, denoise: EDMDenoiser, x_T: Tensor, generator: Any = None, after_step: EDMAfterStep | None = None,
               callback: StepCallback | None = None) -> Tensor:
        """x_T ~ N(0, I) (the family's prior) is scaled to sigma_max and walked down to sigma = 0."""
        return self.run(denoise, x_T * self.sigma_list[0], 0, generator, after_step, callback)

    @torch.no_grad()
    def vary(self, denoise: EDMDenoiser, x0: Tensor, strength: float, generator: Any = None,
             callback: StepCallback | None = None) -> Tensor:
        """SDEdit (Meng et al. 2022): x_0 + sigma n at the level where the last ``strength`` of the steps begin."""
        if not 0.0 < float(strength) <= 1.0:
            raise ConfigError(f"strength={strength} must be in (0, 1]: how far toward noise the input is pushed before "
                              "denoising (SDEdit; 0.3 keeps the layout, 1 ignores the input).")
        start = self.start_for(strength)
        x = x0 + self.sigma_list[start] * randn(tuple(x0.shape), x0, generator)
        return self.run(denoise, x, start, generator, None, callback)

    @torch.no_grad()
    def run(self, denoise: EDMDenoiser, x: Tensor, start: int = 0, generator: Any = None,
            after_step: EDMAfterStep | None = None, callback: StepCallback | None = None) -> Tensor:
        """Walk from step ``start`` (``x`` = x_0 + sigmas()[start] n, in VE space) to sigma = 0."""
        sigmas, gammas = self.sigma_list, self.gammas()
        self.last_nfe = 0

        def d_at(x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
            self.last_nfe += 1
            denoised = denoise(x, torch.full((len(x),), sigma, dtype=x.dtype, device=x.device), self.clip_denoised)
            return (x - denoised) / sigma, denoised

        for i in range(start, self.steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_hat = sigma + gammas[i] * sigma
            if sigma_hat > sigma:  # churn: raise the noise level from sigma to sigma_hat
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * self.S_noise * randn(tuple(x.shape), x, generator)
            d, denoised = d_at(x, sigma_hat)
            x_next = x + (sigma_next - sigma_hat) * d
            if sigma_next > 0:  # Heun's correction, except on the last step (to sigma = 0)
                d_next, _ = d_at(x_next, sigma_next)
                x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
            x = x_next
            if after_step is not None:
                x = after_step(x, sigma_next)
            if callback is not None:
                callback({"i": i, "steps": self.steps, "sigma": sigma, "sigma_hat": sigma_hat, "sigma_next": sigma_next,
                          "x": x, "denoised": denoised, "nfe": self.last_nfe})
        return x


class KnownRegionVE:
    """Replacement inpainting in VE space (Song et al. 2021's imputation): after each step to sigma, the known
    region is replaced by known + sigma z; at sigma = 0 by ``known`` itself. ``mask`` is 1 where x is known."""

    def __init__(self, known: Tensor, mask: Tensor, generator: Any = None):
        self.known, self.mask, self.generator = known, mask, generator

    def paste(self, x: Tensor, sigma: float) -> Tensor:
        noised = self.known if sigma == 0 else self.known + sigma * randn(tuple(x.shape), x, self.generator)
        return self.mask * noised + (1 - self.mask) * x


def vp_denoiser(denoise: EDMDenoiser, schedule: NoiseSchedule) -> Denoiser:
    """An EDM denoiser as the ``denoise(x_t, t, clip) -> (x0_hat, eps_hat)`` that DDIM / DPM-Solver++ / Heun call:
    at (fractional) timestep t with alpha_bar = a, x_t / sqrt(a) = x_0 + sigma eps, sigma = sqrt((1 - a) / a).
    ``clip`` is passed on to ``denoise``; eps_hat follows from the (possibly clipped) x0_hat."""

    def vp(x_t: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor]:
        a = schedule.alpha_bar_at(t, x_t)
        sigma = ((1 - a) / a).sqrt()
        x0 = denoise(x_t / a.sqrt(), sigma.flatten(), clip)
        return x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return vp
