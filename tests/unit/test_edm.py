"""EDM (gencli.diffusion.edm) against NVlabs/edm, transcribed below, step by step in float64.

The reference functions are transcriptions of NVlabs/edm (commit 008a4e5) ``training/networks.py``
``EDMPrecond.forward``, ``training/loss.py`` ``EDMLoss.__call__`` and ``generate.py`` ``edm_sampler``, changed only
where they must be to run here: float64 instead of EDM's float32 casts, a plain function F(x, c_noise) for the
model, ``torch.randn_like`` replaced by draws from a seeded generator, and a list that records x after each step.
The same noise reaches both implementations; they must agree to float64 rounding (rtol 1e-12).
Closed-form checks use Gaussian data N(mu, s^2 I), whose ideal denoiser is D(x; sigma) = (s^2 x + sigma^2 mu) /
(s^2 + sigma^2) and whose probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) fixed, so it maps x at sigma_max
to mu + s (x - mu) / sqrt(s^2 + sigma_max^2) at sigma = 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gencli.diffusion.edm import (
    EDMLoss,
    EDMPreconditioning,
    EDMSampler,
    KnownRegionVE,
    edm_sigmas,
    vp_denoiser,
)
from gencli.diffusion.samplers import DDIMSampler, DPMSolverPP2M, HeunSampler
from gencli.diffusion.schedule import ConfigError, NoiseSchedule

F64 = dict(rtol=1e-12, atol=1e-12)


def fake_F(x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
    """A smooth stand-in network F(x, c_noise), fed identically to both implementations."""
    c = c_noise.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    out = 0.5 * torch.tanh(x) + 0.1 * torch.cos(3 * x) + 0.3 * torch.sin(c) * x
    return out if labels is None else out + 0.01 * labels.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class FakeNet(torch.nn.Module):
    num_classes = 0

    def __init__(self):
        super().__init__()
        self.seen_t = []

    def forward(self, x, t, labels=None):
        self.seen_t.append(t)
        return fake_F(x, t, labels)


# ----------------------------------------------------------------- the reference (NVlabs/edm, transcribed)
def ref_edm_precond(model, x, sigma, sigma_data=0.5):
    """EDMPrecond.forward, float64 (EDM casts x and sigma to float32)."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    F_x = model((c_in * x), c_noise.flatten())
    D_x = c_skip * x + c_out * F_x
    return D_x


class RefEDMLoss:
    """EDMLoss.__call__; torch.randn(...) / randn_like draw from ``g`` in float32, then float64 (as gencli does)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, g):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], generator=g).double()
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        y = images
        n = torch.randn(y.shape, generator=g).double() * sigma
        D_yn = net(y + n, sigma)
        loss = weight * ((D_yn - y) ** 2)
        return loss, sigma


def ref_edm_sampler(net, latents, randn_like, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                    S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, record=None):
    """generate.py edm_sampler (net.sigma_min = 0, net.sigma_max = inf, round_sigma = identity, no labels)."""
    # Time step discretization.
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    # Main sampling loop.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if record is not None:
            record.append(x_next)

    return x_next, t_steps


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def x_like(n=3, seed=0):
    return torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=gen(seed))


# ----------------------------------------------------------------- preconditioning and loss
def test_preconditioning_matches_edm_precond():
    x = x_like() * 3
    sigma = torch.tensor([0.002, 0.7, 80.0], dtype=torch.float64)
    ours = EDMPreconditioning(FakeNet(), sigma_data=0.5)
    torch.testing.assert_close(ours(x, sigma), ref_edm_precond(fake_F, x, sigma), **F64)
    torch.testing.assert_close(ours.net.seen_t[-1], sigma.log() / 4, **F64)  # c_noise is what the net sees as t
    # one sigma for the whole batch, as a float or a 0-d tensor
    torch.testing.assert_close(ours(x, 0.7), ref_edm_precond(fake_F, x, torch.full((3,), 0.7, dtype=torch.float64)),
                               **F64)


def test_preconditioning_coefficients_give_unit_variance_and_unit_weight():
    """Table 1's derivation: Var(c_in x) = 1 and Var(F_target) = 1 for data of std sigma_data, and the loss weight
    lambda = 1 / c_out^2 (so lambda ||D - x0||^2 = ||F - F_target||^2)."""
    pre, loss = EDMPreconditioning(FakeNet(), sigma_data=0.5), EDMLoss(sigma_data=0.5)
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    c_skip, c_out, c_in, _ = pre.coefficients(sigma)
    sd = 0.5
    torch.testing.assert_close(c_in**2 * (sd**2 + sigma**2), torch.ones_like(sigma), **F64)
    # F_target = (x0 - c_skip (x0 + sigma n)) / c_out: variance ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(var_target, torch.ones_like(sigma), **F64)
    torch.testing.assert_close(loss.weight(sigma) * c_out**2, torch.ones_like(sigma), **F64)
    # raw_target is the F that makes D exact
    x0, n = x_like(seed=1), x_like(seed=2)
    s = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    x = x0 + s.reshape(-1, 1, 1, 1) * n
    target = pre.raw_target(x0, x, s)
    cs, co, _, _ = pre.coefficients(s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(cs * x + co * target, x0, **F64)


def test_c_noise_scale_and_labels_reach_the_net():
    net = FakeNet()
    pre = EDMPreconditioning(net, c_noise_scale=250.0)
    x, sigma = x_like(), torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    labels = torch.tensor([0, 3, 7])
    out = pre(x, sigma, labels)
    torch.testing.assert_close(net.seen_t[-1], sigma.log() / 4 * 250, **F64)
    assert not torch.allclose(out, pre(x, sigma))  # the labels changed F's output


def test_loss_matches_edm_loss():
    images = x_like(4, seed=3).clamp(-1, 1)
    pre = EDMPreconditioning(FakeNet())
    ref_loss, ref_sigma = RefEDMLoss()(lambda x, s: ref_edm_precond(fake_F, x, s), images, gen(7))
    ours, sigma = EDMLoss()(pre, images, generator=gen(7))
    torch.testing.assert_close(sigma, ref_sigma.flatten(), **F64)
    torch.testing.assert_close(ours, ref_loss.flatten(1).mean(1), **F64)
    # given sigma and noise, nothing is drawn
    noise = x_like(4, seed=4)
    a, _ = EDMLoss()(pre, images, sigma=sigma, noise=noise)
    b, _ = EDMLoss()(pre, images, sigma=sigma, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_draws_log_normal_sigmas():
    loss = EDMLoss(P_mean=-1.2, P_std=1.2)
    log_sigma = loss.sample_sigmas(20000, torch.zeros(1, dtype=torch.float64), gen(0)).log()
    # mean within 5 standard errors (1.2 / sqrt(20000) = 0.0085), std within 3%
    assert abs(float(log_sigma.mean()) + 1.2) < 0.045
    assert abs(float(log_sigma.std()) - 1.2) < 0.036


# ----------------------------------------------------------------- the sampler
@pytest.mark.parametrize("steps", [2, 5, 18])
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_sigmas_match_edm_t_steps(steps, rho):
    _, t_steps = ref_edm_sampler(lambda x, s: x, torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                                 lambda x: torch.zeros_like(x), num_steps=steps, rho=rho)
    np.testing.assert_allclose(edm_sigmas(steps, 0.002, 80, rho), t_steps.numpy(), rtol=1e-14, atol=0)
    assert edm_sigmas(1, 0.002, 80) == [80.0, 0.0]


CHURN = {
    "deterministic": dict(S_churn=0),
    "churn_everywhere": dict(S_churn=10, S_noise=1.007),
    "churn_in_a_range": dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),  # EDM's ImageNet-64 settings
}


@pytest.mark.parametrize("steps", [5, 18])
@pytest.mark.parametrize("setting", list(CHURN))
def test_sampler_matches_edm_sampler_step_by_step(steps, setting):
    churn = CHURN[setting]
    latents = x_like(3, seed=11)
    S_min, S_max = churn.get("S_min", 0), churn.get("S_max", float("inf"))
    sigmas = edm_sigmas(steps)

    # EDM calls randn_like on every step; the noise only counts where the step churns (it is multiplied by 0
    # elsewhere), and there it must be gencli's draw: the same generator, in the same order.
    ref_g, junk = gen(5), gen(99)
    calls = []

    def randn_like(x):
        i = len(calls)
        calls.append(i)
        churns = churn["S_churn"] > 0 and S_min <= sigmas[i] <= S_max
        return torch.randn(x.shape, generator=ref_g if churns else junk).double()

    ref_calls = []

    def ref_net(x, sigma):
        ref_calls.append(1)
        return ref_edm_precond(fake_F, x, torch.as_tensor(sigma).expand(len(x)))

    record = []
    ref_out, _ = ref_edm_sampler(ref_net, latents, randn_like, num_steps=steps, record=record, **churn)

    sampler = EDMSampler(steps=steps, **churn)
    pre = EDMPreconditioning(FakeNet())
    seen = []
    ours = sampler.sample(lambda x, s, clip: pre(x, s), latents, generator=gen(5), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(steps))
    for info, ref_x in zip(seen, record):
        torch.testing.assert_close(info["x"], ref_x, **F64)
    torch.testing.assert_close(ours, ref_out, **F64)
    assert sampler.last_nfe == sampler.nfe() == len(ref_calls) == 2 * steps - 1
    assert seen[-1]["nfe"] == sampler.last_nfe
    assert sampler.deterministic == (churn["S_churn"] == 0)
    if setting == "churn_in_a_range":  # some steps churn, some do not
        gammas = sampler.gammas()
        assert 0 < sum(g > 0 for g in gammas) < steps


def gaussian_denoiser(mu: float, s: float):
    """The ideal denoiser of data N(mu, s^2 I): E[x0 | x0 + sigma n = x]."""

    def denoise(x, sigma, clip):
        sig2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return (s**2 * x + sig2 * mu) / (s**2 + sig2)

    return denoise


def test_deterministic_sampler_transports_noise_to_gaussian_data_at_second_order():
    mu, s = 0.3, 0.4
    z = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=gen(1))
    errors = {}
    for steps in (16, 32, 64):
        sampler = EDMSampler(steps=steps, sigma_min=0.002, sigma_max=80)
        out = sampler.sample(gaussian_denoiser(mu, s), z)
        # exact ODE map from x = sigma_max z: x0 = mu + s (x - mu) / sqrt(s^2 + sigma_max^2)
        exact = mu + s * (80 * z - mu) / math.sqrt(s**2 + 80**2)
        errors[steps] = float((out - exact).abs().max())
    # measured: 0.115, 0.025, 0.0058 (largest |error| over 1024 values, |z| up to 3.5, x at sigma_max = 80 z)
    assert errors[64] < 1e-2
    # Heun is second order: halving the step size divides the error by about 4 (4.3-4.6 measured; >= 3.5 asked)
    assert errors[16] / errors[32] > 3.5 and errors[32] / errors[64] > 3.5, errors


def test_stochastic_sampler_keeps_the_gaussian_target():
    mu, s = 0.3, 0.4
    z = torch.randn(4000, 1, 2, 2, dtype=torch.float64, generator=gen(2))
    # Churn adds discretisation error (measured std 0.451 at 18 steps, 0.410 at 64, 0.403 at 256), so many steps:
    sampler = EDMSampler(steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0)
    out = sampler.sample(gaussian_denoiser(mu, s), z, generator=gen(3))
    # 16000 values: mean within 5 standard errors (0.4 / sqrt(16000) = 0.0032), std within 3%
    assert abs(float(out.mean()) - mu) < 0.016
    assert abs(float(out.std()) - s) < 0.012
    again = EDMSampler(steps=256, S_churn=40, S_min=0.05, S_max=50).sample(gaussian_denoiser(mu, s), z, generator=gen(3))
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # the generator decides the noise


def test_variation_starts_at_the_level_of_its_strength():
    mu, s = 0.0, 0.5
    x0 = x_like(2, seed=5).clamp(-1, 1)
    sampler = EDMSampler(steps=10)
    seen = []
    out = sampler.vary(gaussian_denoiser(mu, s), x0, strength=0.3, generator=gen(4), callback=seen.append)
    start = sampler.start_for(0.3)
    assert start == 7 and [info["i"] for info in seen] == [7, 8, 9]
    assert seen[-1]["nfe"] == sampler.nfe(start) == 5
    noise = torch.randn(x0.shape, generator=gen(4)).double()
    expected = sampler.run(gaussian_denoiser(mu, s), x0 + sampler.sigmas()[start] * noise, start)
    torch.testing.assert_close(out, expected, **F64)
    with pytest.raises(ConfigError, match="strength=0"):
        sampler.vary(gaussian_denoiser(mu, s), x0, strength=0)


def test_replacement_inpainting_pastes_the_known_region_at_each_level():
    known = x_like(2, seed=6)
    mask = torch.zeros_like(known)
    mask[..., :2] = 1
    levels = []
    region = KnownRegionVE(known, mask, gen(0))

    def after_step(x, sigma):
        levels.append(sigma)
        return region.paste(x, sigma)

    out = EDMSampler(steps=4).sample(gaussian_denoiser(0.0, 0.5), x_like(2, seed=7), after_step=after_step)
    assert levels == edm_sigmas(4)[1:]
    torch.testing.assert_close(out * mask, known * mask, rtol=0, atol=0)


def test_existing_samplers_run_an_edm_denoiser_through_vp_denoiser():
    """DDIM, DPM-Solver++ and Heun walk a NoiseSchedule in VP space; vp_denoiser feeds them an EDM denoiser. With
    the ideal Gaussian denoiser, the deterministic solvers land on the exact ODE map of x_T (the VP and VE ODEs
    have the same solutions, scaled), up to their discretisation error."""
    mu, s = 0.3, 0.4
    schedule = NoiseSchedule("linear", 1000)
    z = torch.randn(32, 1, 2, 2, dtype=torch.float64, generator=gen(8))
    a_T = float(schedule.alphas_cumprod[-1])
    sigma_T = math.sqrt((1 - a_T) / a_T)
    exact = mu + s * (z / math.sqrt(a_T) - mu) / math.sqrt(s**2 + sigma_T**2)
    denoise = vp_denoiser(gaussian_denoiser(mu, s), schedule)
    x0, eps = denoise(z, torch.full((32,), 999), False)
    sigma = torch.full((32,), sigma_T, dtype=torch.float64)
    torch.testing.assert_close(x0, gaussian_denoiser(mu, s)(z / math.sqrt(a_T), sigma, False), **F64)
    torch.testing.assert_close(math.sqrt(a_T) * x0 + math.sqrt(1 - a_T) * eps, z, **F64)
    # measured max |error| at 100 / 200 steps: DDIM 0.062 / 0.031 (first order), DPM-Solver++ 0.0020 / 0.00062,
    # Heun (Karras sigmas) 0.0025 / 0.00020
    for make, order_ratio, tol in ((lambda n: DDIMSampler(steps=n, clip_denoised=False), 1.8, 0.04),
                                   (lambda n: DPMSolverPP2M(steps=n, clip_denoised=False), 3.0, 1e-3),
                                   (lambda n: HeunSampler(steps=n, sigmas="karras", clip_denoised=False), 3.0, 1e-3)):
        err = [float((make(n).sample(denoise, schedule, z) - exact).abs().max()) for n in (100, 200)]
        assert err[1] < tol and err[0] / err[1] > order_ratio, (make(100), err)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=0), "sampler.steps=0"),
    (dict(sigma_min=0), "sampler.sigma_min=0"),
    (dict(sigma_min=100), "sampler.sigma_min=100"),
    (dict(S_churn=-1), "sampler.S_churn=-1"),
    (dict(S_min=10, S_max=1), "sampler.S_min=10"),
    (dict(S_noise=0), "sampler.S_noise=0"),
    (dict(rho=float("nan")), "sampler.rho=nan"),
])
def test_bad_sampler_settings_are_refused_by_name(bad, match):
    with pytest.raises(ConfigError, match=match):
        EDMSampler(**bad)


def test_bad_model_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="model.sigma_data=0"):
        EDMPreconditioning(FakeNet(), sigma_data=0)
    with pytest.raises(ConfigError, match="model.sigma_min=1"):
        EDMPreconditioning(FakeNet(), sigma_min=1, sigma_max=1)
    with pytest.raises(ConfigError, match="model.P_std=-1"):
        EDMLoss(P_std=-1)


def test_preconditioned_mlp_trains_on_gaussian_data_and_samples_it():
    """The pieces together on gencli's MLP denoiser (float32): EDMLoss trains it, EDMSampler samples the data."""
    from gencli.nets.mlp import MLPDenoiser

    torch.manual_seed(0)
    mu, sd = torch.tensor([0.5, -0.3]), 0.2
    g = gen(0)
    model = EDMPreconditioning(MLPDenoiser(2, hidden=64, depth=2, time_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = EDMLoss()
    for _ in range(300):
        loss, _ = loss_fn(model, mu + sd * torch.randn(256, 2, generator=g), generator=g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    sampler = EDMSampler(steps=18)
    out = sampler.sample(lambda x, s, clip: model(x, s), torch.randn(4000, 2, generator=gen(1)))
    assert sampler.last_nfe == 35
    # measured (400 steps): mean (0.48, -0.27), std (0.22, 0.22)
    assert (out.mean(0) - mu).abs().max() < 0.06
    assert ((out.std(0) / sd - 1).abs() < 0.25).all()
