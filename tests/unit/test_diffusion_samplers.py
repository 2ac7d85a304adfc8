"""DDPM and DDIM samplers against their formulas, in float64, with a fixed stand-in denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from gencli.diffusion.samplers import DDIMSampler, DDPMSampler, spaced_timesteps
from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError

T = 1000


def fake_denoiser(schedule: NoiseSchedule):
    """A deterministic 'network': eps_hat = 0.5 tanh(x_t) + 0.1 t/T, converted like the family does."""

    def denoise(x, t, clip):
        eps = 0.5 * torch.tanh(x) + 0.1 * t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / T
        return schedule.split_prediction("eps", eps, x, t, clip_x0=clip)

    return denoise


def x_T(n=4, seed=0):
    return torch.randn(n, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_spacings_for_ten_of_a_thousand_steps():
    assert spaced_timesteps(T, 10, "leading") == list(range(900, -1, -100))
    assert spaced_timesteps(T, 10, "trailing") == list(range(999, 0, -100))
    assert spaced_timesteps(T, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_spacing_with_all_steps_visits_every_timestep(spacing):
    assert spaced_timesteps(T, T, spacing) == list(range(T - 1, -1, -1))
    for steps in (1, 7, 50, 333):
        ts = spaced_timesteps(T, steps, spacing)
        assert len(ts) == steps and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] < T


def test_bad_sampler_settings_are_config_errors():
    with pytest.raises(ConfigError, match="sampler.steps=2000"):
        spaced_timesteps(T, 2000)
    with pytest.raises(ConfigError, match="sampler.spacing='uniform'"):
        DDIMSampler(spacing="uniform")
    with pytest.raises(ConfigError, match="sampler.eta=2"):
        DDIMSampler(eta=2)
    with pytest.raises(ConfigError, match="sampler.variance='large'"):
        DDPMSampler(variance="large")
    with pytest.raises(ConfigError, match="sampler.steps=0"):
        DDIMSampler(steps=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta0_all_steps_is_the_deterministic_ddim_formula(kind):
    s = NoiseSchedule(kind, T)
    denoise = fake_denoiser(s)
    start = x_T()
    got = DDIMSampler(steps=T, eta=0.0, clip_denoised=False).sample(denoise, s, start)
    # By hand: x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1}) eps_hat (Song et al. eq. 12, sigma = 0).
    x = start.clone()
    for t in range(T - 1, -1, -1):
        eps = 0.5 * torch.tanh(x) + 0.1 * t / T
        ab = s.alphas_cumprod[t]
        ab_prev = s.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)
    # Deterministic: the generator plays no part.
    again = DDIMSampler(steps=T, eta=0.0, clip_denoised=False).sample(denoise, s, start, torch.Generator().manual_seed(5))
    assert torch.equal(got, again)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta1_variance_is_ddpm_beta_tilde(kind):
    s = NoiseSchedule(kind, T)
    sampler = DDIMSampler(steps=T, eta=1.0)
    for t in range(1, T):
        sigma2 = sampler.sigma(s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()) ** 2
        assert sigma2 == pytest.approx(s.posterior_variance[t].item(), rel=1e-9)


def test_ddim_eta1_step_has_beta_tilde_variance_empirically():
    s = NoiseSchedule("linear", T)
    t, n = 500, 100_000
    a_t, a_prev = s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()
    x = torch.zeros(n, 1, dtype=torch.float64)
    x0, eps = torch.full_like(x, 0.3), torch.full_like(x, -0.2)
    out = DDIMSampler(eta=1.0).step(x, x0, eps, a_t, a_prev, torch.Generator().manual_seed(0))
    assert out.var().item() == pytest.approx(s.posterior_variance[t].item(), rel=0.02)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta1_all_steps_walks_the_same_chain_as_ddpm_beta_tilde(kind):
    """Same x_T, same noise draws: DDIM(eta=1, T steps) and DDPM(sigma^2 = beta_tilde) agree step by step."""
    s = NoiseSchedule(kind, T)
    denoise = fake_denoiser(s)
    ddim = DDIMSampler(steps=T, eta=1.0, clip_denoised=True).sample(denoise, s, x_T(), torch.Generator().manual_seed(3))
    ddpm = DDPMSampler(variance="beta_tilde", clip_denoised=True).sample(denoise, s, x_T(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-7, atol=1e-7)


def test_ddpm_step_is_the_posterior_with_the_chosen_variance():
    s = NoiseSchedule("linear", T)
    t = 321
    a_t, a_prev = s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()
    x, x0 = x_T(20_000, 1)[:, :1, :1, :1].flatten(1), torch.full((20_000, 1), 0.25, dtype=torch.float64)
    mean, var = s.posterior(x0, x, torch.full((len(x),), t))
    for variance, expected in (("beta_tilde", var[0].item()), ("beta", s.betas[t].item())):
        out = DDPMSampler(variance=variance).step(x, x0, None, a_t, a_prev, torch.Generator().manual_seed(0))
        assert (out - mean).mean().item() == pytest.approx(0, abs=5 * math.sqrt(expected / len(x)))
        assert (out - mean).var().item() == pytest.approx(expected, rel=0.05)


def test_fewer_ddpm_steps_respace_the_chain():
    s = NoiseSchedule("linear", T)
    sampler = DDPMSampler(steps=10)
    assert sampler.timesteps(s) == list(range(999, 0, -100))
    denoise = fake_denoiser(s)
    out = sampler.sample(denoise, s, x_T(), torch.Generator().manual_seed(0))
    # The respaced chain is the DDPM of the 10-step schedule beta'_k = 1 - ab_k / ab_{k-1}, whose posterior
    # variance is exactly what DDIM's eta = 1 uses on the same 10 timesteps: same x_T, same noise, same images.
    ddim = DDIMSampler(steps=10, eta=1.0, spacing="trailing").sample(denoise, s, x_T(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ddim, rtol=1e-7, atol=1e-7)
    # and it is not the 1000-step chain
    assert not torch.allclose(out, DDPMSampler().sample(denoise, s, x_T(), torch.Generator().manual_seed(0)))


def test_describe_names_steps_and_eta():
    assert DDIMSampler(steps=20, eta=0.5, spacing="leading").describe() == {
        "name": "ddim", "steps": 20, "spacing": "leading", "clip_denoised": True, "eta": 0.5}
    assert DDPMSampler().describe()["variance"] == "beta_tilde"
    assert DDIMSampler(eta=0).deterministic and not DDIMSampler(eta=0.1).deterministic
    assert not DDPMSampler().deterministic
