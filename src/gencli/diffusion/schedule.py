"""NoiseSchedule: the forward process q(x_t | x_0) of a diffusion model, apart from any network.

As in diffusers' scheduler/model split, the network only maps (x_t, t) to a prediction; everything
about noise levels lives here. All tables are computed in float64 once (the cumulative product
alpha_bar_t loses precision in float32 at small t), kept on the CPU, and cast to the input's dtype
and device only when gathered at a batch of timesteps.

Notation (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, with
timesteps indexed 0..T-1 (the paper's t = 1..T).

- ``q_sample``:          x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
- ``posterior``:         q(x_{t-1} | x_t, x_0) = N(mean, beta_tilde_t), beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
- prediction targets:    eps, x0, and v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)

Schedules: ``linear`` (beta from ``beta_start`` to ``beta_end``, DDPM) and ``cosine``
(alpha_bar_t = cos^2(((t/T + s) / (1 + s)) pi/2), Nichol & Dhariwal 2021, betas clipped at 0.999).
Left unset, the linear betas are DDPM's 1e-4..0.02 scaled by 1000/T as in Nichol & Dhariwal's code,
so any T ends in (near) pure noise; DDPM's own values at T = 1000. Sampling starts from N(0, I),
so a schedule whose last step keeps signal (alpha_bar_{T-1} > 1e-2) is refused: it would train
on one distribution of x_T and sample from another.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gencli.errors import ConfigError

KINDS = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
# Largest alpha_bar allowed at the last step: sqrt(1e-2) = 10% of x_0 left in x_T.
MAX_TERMINAL_ALPHA_BAR = 1e-2


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """Precomputed float64 tables of a discrete-time Gaussian diffusion with ``timesteps`` steps."""

    def __init__(
        self,
        kind: str = "linear",
        timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        cosine_s: float = 0.008,
    ):
        if kind not in KINDS:
            raise ConfigError(f"model.schedule.kind={kind!r} is not a noise schedule; use linear or cosine.")
        if int(timesteps) < 2:
            raise ConfigError(f"model.schedule.timesteps={timesteps} must be an integer >= 2 (DDPM uses 1000).")
        timesteps = int(timesteps)
        # DDPM's betas are for T = 1000; scaled by 1000/T they give the same total noise for any T.
        beta_start = 1e-4 * 1000 / timesteps if beta_start is None else beta_start
        beta_end = 0.02 * 1000 / timesteps if beta_end is None else beta_end
        if kind == "linear" and not 0 < beta_start < beta_end < 1:
            raise ConfigError(f"model.schedule beta_start={beta_start:g}, beta_end={beta_end:g} (timesteps={timesteps}): "
                              "need 0 < beta_start < beta_end < 1. Leave both null for DDPM's 1e-4..0.02 scaled "
                              "by 1000/timesteps, which needs timesteps > 20; for fewer steps use "
                              "model.schedule.kind=cosine.")
        self.kind = kind
        self.timesteps = timesteps
        self.beta_start, self.beta_end, self.cosine_s = float(beta_start), float(beta_end), float(cosine_s)
        betas = (linear_betas(self.timesteps, self.beta_start, self.beta_end) if kind == "linear"
                 else cosine_betas(self.timesteps, self.cosine_s))
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        if self.alphas_cumprod[-1] > MAX_TERMINAL_ALPHA_BAR:
            raise ConfigError(
                f"model.schedule ({self.describe_text()}) leaves alpha_bar = {self.alphas_cumprod[-1]:.3g} at the last "
                f"step, so x_T still holds {self.alphas_cumprod[-1].sqrt():.0%} of the image, but sampling starts from "
                "pure noise. Raise model.schedule.beta_end or timesteps, leave beta_start/beta_end null (scaled to "
                "timesteps), or use model.schedule.kind=cosine.")
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # beta_tilde: the variance of the true posterior q(x_{t-1} | x_t, x_0); 0 at t = 0.
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        self._device_cache: dict[tuple, Tensor] = {}

    def describe(self) -> dict:
        out = {"kind": self.kind, "timesteps": self.timesteps}
        if self.kind == "linear":
            out.update(beta_start=self.beta_start, beta_end=self.beta_end)
        else:
            out.update(cosine_s=self.cosine_s)
        return out

    def describe_text(self) -> str:
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.describe().items())

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.describe_text()})"

    # ----------------------------------------------------------------- gathering
    def at(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` shaped to broadcast over ``like`` (N, ...), in ``like``'s dtype and device."""
        return self.table(table, like.device, like.dtype)[t.to(like.device).long()].reshape(-1, *([1] * (like.ndim - 1)))

    def table(self, table: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``table`` on ``device`` in ``dtype``, copied there once (not at every sampler step)."""
        key = (id(table), device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._device_cache[key] = table.to(device=device, dtype=dtype)
        return cached

    # ----------------------------------------------------------------- noise levels between the timesteps
    @functools.cached_property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64: the noise-to-signal ratio that the
        continuous-time samplers (Heun, DPM-Solver) step in (x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @functools.cached_property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @functools.cached_property
    def alphas_cumprod_list(self) -> list[float]:
        """alpha_bar_t as Python floats (the float64 values themselves): what the samplers read per step, so that a
        step never converts a tensor to a number (a host sync when a table lives on a GPU; a cost anywhere)."""
        return self.alphas_cumprod.tolist()

    @functools.cached_property
    def log_sigmas_list(self) -> list[float]:
        return self.log_sigmas.tolist()

    def sigma_at(self, t: float) -> float:
        """sigma at a timestep that may fall between two integers: log sigma interpolated linearly between them,
        the inverse of :meth:`t_of_sigma` (diffusers' ``_sigma_to_t``); exact at integer t."""
        return self.sigmas_at([t])[0]

    def sigmas_at(self, levels: list[float]) -> list[float]:
        """:meth:`sigma_at` of each level, computed in one tensor operation (a sampler's levels, once per pass)."""
        lows, weights = [], []
        for t in levels:
            if not 0 <= t <= self.timesteps - 1:
                raise ValueError(f"timestep {t} is outside 0..{self.timesteps - 1}")
            low = min(int(math.floor(t)), self.timesteps - 2)
            lows.append(low)
            weights.append(t - low)
        if not lows:
            return []
        low = torch.tensor(lows)
        w = torch.tensor(weights, dtype=torch.float64)
        # the same float64 operations (and exp kernel) as one level at a time: identical values
        between = torch.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1])
        return torch.where(w == 0, self.sigmas[low], between).tolist()

    def t_of_sigma(self, sigma: float) -> float:
        """The (fractional) timestep whose noise level is ``sigma``: log sigma interpolated between the two
        neighbouring timesteps, clipped to 0..T-1 (Karras et al. 2022's sigmas fall between timesteps)."""
        log_sigmas = self.log_sigmas_list
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(min(sum(1 for v in log_sigmas if v <= log_sigma) - 1, self.timesteps - 2))
        low = max(low, 0)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def alpha_bar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar at timesteps ``t``, shaped to broadcast over ``like``: gathered for integer t, from the
        interpolated sigma (alpha_bar = 1 / (1 + sigma^2), :meth:`sigma_at`) for fractional t.

        Computed on ``like``'s device without reading ``t`` back: a solver's denoiser calls this at every step, and
        a look at the values (which are integers?) would wait for the GPU each time."""
        if not torch.is_floating_point(t):
            return self.at(self.alphas_cumprod, t, like)
        t = t.to(device=like.device, dtype=torch.float64).flatten()
        whole = t.round()
        low = t.floor().clamp(0, self.timesteps - 2).long()
        w = t - low
        log_sigmas = self.table(self.log_sigmas, like.device, torch.float64)
        sigma = torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1])
        between = 1.0 / (1.0 + sigma**2)
        gathered = self.table(self.alphas_cumprod, like.device, torch.float64)[whole.clamp(0, self.timesteps - 1).long()]
        values = torch.where(t == whole, gathered, between)
        return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> Tensor:
        """Uniform t in {0, ..., T-1} (the simple loss of Ho et al. samples t uniformly)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=gen_device).to(device)

    # ----------------------------------------------------------------- the forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given standard-normal ``noise``."""
        return self.at(self.sqrt_alphas_cumprod, t, x0) * x0 + self.at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (beta_tilde_t) of q(x_{t-1} | x_t, x_0)."""
        mean = self.at(self.posterior_mean_coef_x0, t, xt) * x0 + self.at(self.posterior_mean_coef_xt, t, xt) * xt
        return mean, self.at(self.posterior_variance, t, xt)

    # ----------------------------------------------------------------- eps <-> x0 <-> v
    def x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (xt - self.at(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / self.at(self.sqrt_alphas_cumprod, t, xt)

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (xt - self.at(self.sqrt_alphas_cumprod, t, xt) * x0) / self.at(self.sqrt_one_minus_alphas_cumprod, t, xt)

    def v_from(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.at(self.sqrt_alphas_cumprod, t, x0) * eps - self.at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self.at(self.sqrt_alphas_cumprod, t, xt) * xt - self.at(self.sqrt_one_minus_alphas_cumprod, t, xt) * v

    def eps_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self.at(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt + self.at(self.sqrt_alphas_cumprod, t, xt) * v

    def target(self, prediction: str, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for ``prediction`` = eps | v | x0."""
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        if prediction == "v":
            return self.v_from(x0, eps, t)
        raise ConfigError(f"model.prediction={prediction!r} is not known; use one of {', '.join(PREDICTIONS)}.")

    def min_snr_weight(self, prediction: str, t: Tensor, gamma: float, like: Tensor) -> Tensor:
        """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023), shape (N,): the x0-space weight
        min(SNR_t, gamma) expressed for the target actually predicted (eps: / SNR; v: / (SNR + 1); x0: as is).
        It stops the low-noise timesteps, which are easy, from dominating the gradient."""
        alpha_bar = self.at(self.alphas_cumprod, t, like).flatten()
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=gamma)
        if prediction == "eps":
            return clipped / snr
        if prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def split_prediction(self, prediction: str, output: Tensor, xt: Tensor, t: Tensor,
                         clip_x0: bool = False) -> tuple[Tensor, Tensor]:
        """Network output -> (x0_hat, eps_hat), whatever it was trained to predict, at timesteps t (integer, or
        fractional for samplers that step between the training timesteps: :meth:`alpha_bar_at`).

        With ``clip_x0`` the x0 estimate is clipped to the data range [-1, 1] and eps recomputed from
        it, as the DDPM reference sampler does (it keeps early, noisy estimates from leaving the range).
        """
        alpha_bar = self.alpha_bar_at(t, xt)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if prediction == "eps":
            eps = output
            x0 = (xt - s * eps) / a
        elif prediction == "x0":
            x0 = output
            eps = (xt - a * x0) / s
        elif prediction == "v":
            x0 = a * xt - s * output
            eps = s * xt + a * output
        else:
            raise ConfigError(f"model.prediction={prediction!r} is not known; use one of {', '.join(PREDICTIONS)}.")
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (xt - a * x0) / s
        return x0, eps
