"""Editing with a trained denoiser: inpainting (RePaint, replacement) and SDEdit variations.

Like the samplers, these know nothing about networks: they take ``denoise(x_t, t, clip) -> (x0_hat, eps_hat)``,
the :class:`NoiseSchedule` and a :class:`Sampler`, and work on x (the image for pixel diffusion, the
latent for latent diffusion). ``mask`` is 1 where x is known and 0 where it is to be filled.

- **Replacement** (Song et al. 2021, appendix on imputation; the baseline of RePaint): after every step
  to noise level alpha_bar, the known region is replaced by the known x noised to that level,
  sqrt(alpha_bar) x_known + sqrt(1 - alpha_bar) z, so the last step pastes x_known itself. Works with any
  sampler (:data:`~gencli.diffusion.samplers.AfterStep`).
- **RePaint** (Lugmayr et al. 2022, alg. 1 and their ``get_schedule_jump``): replacement with resampling.
  Every ``jump_length`` steps the chain goes back up ``jump_length`` steps by the forward process,
  x_t = sqrt(a_t / a_s) x_s + sqrt(1 - a_t / a_s) z, and down again, ``jump_n_sample - 1`` times, so the
  generated region has time to agree with the pasted one. It steps back up, so it needs a Markov sampler
  (ddpm, ddim); the paper uses DDPM's ancestral sampler with (jump_length, jump_n_sample) = (10, 10).
- **SDEdit** (Meng et al. 2022): noise x to the level of step ``start`` (``Sampler.start_for(strength)``)
  and run the sampler from there: strength 0 keeps the input, 1 ignores it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gencli.diffusion.samplers import Denoiser, Sampler, randn
from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError
from gencli.progress import track_steps
from gencli.seeds import SampleGenerator

METHODS = ("repaint", "replace")


def repaint_schedule(n: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's walk over step indices k = n-1 (x_T) .. 0, then -1 (the clean image): down one at a time, and
    from every k that is a multiple of ``jump_length`` (below n - jump_length) back up ``jump_length`` steps,
    ``jump_n_sample - 1`` times (Lugmayr et al.'s ``get_schedule_jump``, reference implementation)."""
    jumps = {k: jump_n_sample - 1 for k in range(0, n - jump_length, jump_length)}
    k, walk = n, []
    while k >= 1:
        k -= 1
        walk.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                walk.append(k)
    walk.append(-1)
    return walk


def check_inpaint(method: str, sampler: Sampler, jump_length: int, jump_n_sample: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"inpaint.method={method!r} is not known; use repaint (Lugmayr et al. 2022, with resampling "
                          "jumps) or replace (paste the noised known pixels after every step, any sampler).")
    if int(jump_length) < 1 or int(jump_n_sample) < 1:
        raise ConfigError(f"inpaint.jump_length={jump_length} and inpaint.jump_n_sample={jump_n_sample} must be >= 1 "
                          "(RePaint uses 10 and 10; jump_n_sample=1 is the replacement method).")
    if method == "repaint" and not sampler.markov:
        raise ConfigError(f"inpaint.method=repaint steps back up the chain, which the multistep solver {sampler.name} "
                          "cannot do. Use sampler=ddpm or sampler=ddim with RePaint, or inpaint.method=replace with "
                          f"{sampler.name}.")


def inpaint_nfe(method: str, sampler: Sampler, schedule: NoiseSchedule, jump_length: int, jump_n_sample: int) -> int:
    """Network evaluations per image: RePaint evaluates once per step down, replacement as the sampler does."""
    if method == "replace":
        return sampler.nfe(schedule)
    walk = repaint_schedule(len(sampler.timesteps(schedule)), int(jump_length), int(jump_n_sample))
    return sum(1 for a, b in zip(walk, walk[1:]) if b < a)


class KnownRegion:
    """x_known where ``mask`` is 1, noised to any level: what both inpainting methods paste after each step."""

    def __init__(self, known: Tensor, mask: Tensor | None, generator: SampleGenerator):
        self.known, self.mask, self.generator = known, mask, generator

    def paste(self, x: Tensor, alpha_bar: float) -> Tensor:
        if self.mask is None:  # latent diffusion pastes in pixel space instead (see LatentDiffusion.inpaint)
            return x
        if alpha_bar >= 1.0:
            noised = self.known
        else:
            noise = randn(tuple(x.shape), x, self.generator)
            noised = math.sqrt(alpha_bar) * self.known + math.sqrt(1.0 - alpha_bar) * noise
        return self.mask * noised + (1 - self.mask) * x


@torch.no_grad()
def inpaint(denoise: Denoiser, schedule: NoiseSchedule, sampler: Sampler, known: Tensor, mask: Tensor | None,
            x_T: Tensor, generator: SampleGenerator = None, method: str = "repaint", jump_length: int = 10,
            jump_n_sample: int = 10) -> Tensor:
    """Fill x where ``mask`` is 0 so that it agrees with ``known`` where it is 1; returns x_0."""
    check_inpaint(method, sampler, jump_length, jump_n_sample)
    region = KnownRegion(known, mask, generator)
    ts = sampler.timesteps(schedule)
    table = schedule.alphas_cumprod_list  # Python floats: no step reads a tensor back
    x = region.paste(x_T, table[ts[0]])
    if method == "replace" or int(jump_n_sample) == 1:
        return sampler.sample(denoise, schedule, x, generator, after_step=region.paste)

    n = len(ts)

    def alpha_bar(k: int) -> float:  # step index k: n-1 is ts[0] (the noisiest), -1 the clean image
        return table[ts[n - 1 - k]] if k >= 0 else 1.0

    walk = repaint_schedule(n, int(jump_length), int(jump_n_sample))
    for k, k_next in track_steps(list(zip(walk, walk[1:])), len(walk) - 1, "repaint steps"):
        a_k, a_next = alpha_bar(k), alpha_bar(k_next)
        if k_next < k:  # down: one sampler step, then the known region at the new level
            x0, eps = denoise(x, sampler.t_tensor(ts[n - 1 - k], x), sampler.clip_denoised)
            x = region.paste(sampler.step(x, x0, eps, a_k, a_next, generator), a_next)
        else:  # up: the forward process q(x_next | x_k) over the skipped steps
            x = math.sqrt(a_next / a_k) * x + math.sqrt(1.0 - a_next / a_k) * randn(tuple(x.shape), x, generator)
    return x


def check_strength(strength: float) -> float:
    if not 0.0 < float(strength) <= 1.0:
        raise ConfigError(f"strength={strength} must be in (0, 1]: how far toward noise the input is pushed before "
                          "denoising (SDEdit; 0.3 keeps the layout, 0.8 keeps little, 1 ignores the input).")
    return float(strength)


@torch.no_grad()
def vary(denoise: Denoiser, schedule: NoiseSchedule, sampler: Sampler, x0: Tensor, strength: float,
         generator: SampleGenerator = None) -> Tensor:
    """SDEdit: x0 noised to the level where the last ``strength`` of the sampler's steps begin, then denoised."""
    start = sampler.start_for(schedule, check_strength(strength))
    level = sampler.levels(schedule)[start]
    alpha_bar = 1.0 / (1.0 + schedule.sigma_at(level) ** 2)
    x = math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * randn(tuple(x0.shape), x0, generator)
    return sampler.sample(denoise, schedule, x, generator, start=start)


def variation_info(sampler: Sampler, schedule: NoiseSchedule, strength: float) -> dict:
    start = sampler.start_for(schedule, strength)
    return {"strength": float(strength), "start_step": start, "start_timestep": sampler.levels(schedule)[start],
            "nfe": sampler.nfe(schedule, start)}
