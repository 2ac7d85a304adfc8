"""NoiseSchedule identities, all in float64: monotone alpha_bar, q_sample statistics, the true
posterior, and eps <-> x0 <-> v conversions."""

from __future__ import annotations

import math

import pytest
import torch

from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError

KINDS = ["linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_is_monotone_and_in_range(kind):
    s = NoiseSchedule(kind=kind, timesteps=1000)
    ab = s.alphas_cumprod
    assert ab.dtype == torch.float64 and len(ab) == 1000
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must strictly decrease"
    assert 0 < ab[-1] < 0.01 and 0.99 < ab[0] < 1
    assert ((s.betas > 0) & (s.betas < 1)).all()
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], ab[:-1])
    assert s.alphas_cumprod_prev[0] == 1


def test_linear_betas_are_the_papers():
    s = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert s.betas[1].item() - s.betas[0].item() == pytest.approx((0.02 - 1e-4) / 999, rel=1e-9)


def test_cosine_alpha_bar_follows_the_closed_form():
    T, c = 1000, 0.008
    s = NoiseSchedule("cosine", T, cosine_s=c)
    f = [math.cos((t / T + c) / (1 + c) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    # Identical except where the 0.999 beta clip bites (the very last steps).
    torch.testing.assert_close(s.alphas_cumprod[:-5], expected[:-5], rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_has_the_right_mean_and_variance(kind, t):
    s = NoiseSchedule(kind, 1000)
    n = 200_000
    x0 = torch.full((n, 1), 0.6, dtype=torch.float64)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    xt = s.q_sample(x0, torch.full((n,), t), noise)
    ab = s.alphas_cumprod[t].item()
    se = math.sqrt((1 - ab) / n)
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.6, abs=5 * se)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_is_the_gaussian_conditional(kind):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_t | x_{t-1}) q(x_{t-1} | x_0), by precision weighting."""
    s = NoiseSchedule(kind, 1000)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(1, 1000, 37)
    x0 = torch.randn(len(t), 3, dtype=torch.float64, generator=g)
    xt = torch.randn(len(t), 3, dtype=torch.float64, generator=g)
    mean, var = s.posterior(x0, xt, t)
    a, b, ab_prev = s.alphas[t, None], s.betas[t, None], s.alphas_cumprod_prev[t, None]
    precision = a / b + 1 / (1 - ab_prev)
    expected_var = 1 / precision
    expected_mean = expected_var * (a.sqrt() / b * xt + ab_prev.sqrt() / (1 - ab_prev) * x0)
    torch.testing.assert_close(var.expand_as(expected_var), expected_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    assert s.posterior_variance[0] == 0  # beta_tilde_1 = 0: the last step is deterministic


@pytest.mark.parametrize("kind", KINDS)
def test_eps_x0_and_v_convert_into_each_other_and_back(kind):
    s = NoiseSchedule(kind, 1000)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (64,), generator=g)
    x0 = torch.rand(64, 2, 4, 4, dtype=torch.float64, generator=g) * 2 - 1
    eps = torch.randn(64, 2, 4, 4, dtype=torch.float64, generator=g)
    xt = s.q_sample(x0, t, eps)
    v = s.v_from(x0, eps, t)
    # The tables' own identity: alpha_bar + (1 - alpha_bar) = 1, so (x_t, v) is a rotation of (x0, eps).
    torch.testing.assert_close(s.x0_from_eps(xt, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.eps_from_x0(xt, t, x0), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.x0_from_v(xt, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.eps_from_v(xt, t, v), eps, rtol=0, atol=1e-12)
    for prediction, output in (("eps", eps), ("x0", x0), ("v", v)):
        assert torch.equal(s.target(prediction, x0, eps, t), output)
        got_x0, got_eps = s.split_prediction(prediction, output, xt, t)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)


def test_clipping_keeps_x0_in_range_and_eps_consistent():
    s = NoiseSchedule("linear", 1000)
    t = torch.full((8,), 900)
    xt = torch.randn(8, 1, 2, 2, dtype=torch.float64) * 3
    x0, eps = s.split_prediction("eps", torch.randn_like(xt) * 5, xt, t, clip_x0=True)
    assert x0.abs().max() <= 1
    torch.testing.assert_close(s.q_sample(x0, t, eps), xt)


def test_gathering_casts_to_the_input_dtype():
    s = NoiseSchedule()
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float32)
    out = s.q_sample(x, torch.tensor([0, 1, 2]), torch.ones_like(x))
    assert out.dtype == torch.float32 and out.shape == x.shape


@pytest.mark.parametrize("kwargs, needle", [
    ({"kind": "sigmoid"}, "kind='sigmoid'"),
    ({"timesteps": 1}, "timesteps=1"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start=0.1"),
    ({"timesteps": 10}, "kind=cosine"),  # DDPM's betas scaled to 10 steps would exceed 1
    # DDPM's betas kept unscaled at T = 100: x_T would still hold 60% of the image
    ({"timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}, "still holds 60%"),
])
def test_bad_schedules_are_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        NoiseSchedule(**kwargs)


def test_unset_linear_betas_are_ddpms_scaled_to_the_number_of_steps():
    ddpm = NoiseSchedule("linear", 1000)
    assert (ddpm.beta_start, ddpm.beta_end) == (1e-4, 0.02)  # the paper's values at T = 1000
    short = NoiseSchedule("linear", 100)
    assert short.beta_start == pytest.approx(1e-3) and short.beta_end == pytest.approx(0.2)
    # both end in near pure noise, so sampling from N(0, I) matches what the net was trained on
    assert ddpm.alphas_cumprod[-1] < 1e-4 and short.alphas_cumprod[-1] < 1e-4


def test_min_snr_weights_for_each_target():
    s = NoiseSchedule("linear", 1000)
    t = torch.tensor([0, 100, 500, 999])
    like = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    gamma = 5.0
    expected_x0 = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    torch.testing.assert_close(s.min_snr_weight("x0", t, gamma, like), expected_x0)
    torch.testing.assert_close(s.min_snr_weight("eps", t, gamma, like), expected_x0 / snr)
    torch.testing.assert_close(s.min_snr_weight("v", t, gamma, like), expected_x0 / (snr + 1))
    eps = s.min_snr_weight("eps", t, gamma, like)
    assert eps[0] < 1e-3 and eps[-1] == 1  # easy low-noise steps are down-weighted, noisy ones keep weight 1
