"""Flow matching (gencli.diffusion.flow) against the closed form for Gaussian data.

For data x ~ N(mu, s^2 I) and noise z ~ N(0, I) on the path x_t = (1 - t) z + t x, x_t ~ N(t mu, V_t I) with
V_t = (1 - t)^2 + t^2 s^2, and the exact (marginal) velocity field is the regression of u = x - z on x_t:

    v*(x, t) = E[u | x_t = x] = mu + (t s^2 - (1 - t)) / V_t (x - t mu),

whose flow maps x at time t_0 to mu + s (x - t_0 mu) / sqrt(V_{t_0}) at t = 1 (the path keeps the standardised
value (x_t - t mu) / sqrt(V_t) fixed). The residual of the loss at the exact field is the conditional variance
Var(u | x_t) = (1 + s^2) - (t s^2 - (1 - t))^2 / V_t per dimension.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gencli.diffusion.flow import FlowMatchingLoss, FlowSampler, FlowVelocity, KnownRegionFlow, ot_pairing
from gencli.diffusion.schedule import ConfigError

MU, S = 0.7, 0.3


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def exact_velocity(mu=MU, s=S):
    def v(x, t, labels=None):
        t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = (1 - t) ** 2 + t**2 * s**2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    return v


def exact_map(x, t0, mu=MU, s=S):
    var = (1 - t0) ** 2 + t0**2 * s**2
    return mu + s * (x - t0 * mu) / math.sqrt(var)


def noise(n=256, seed=1):
    return torch.randn(n, 1, 2, 2, dtype=torch.float64, generator=gen(seed))


# ----------------------------------------------------------------- the loss
def test_loss_is_the_mse_to_the_straight_path_velocity():
    data, z = noise(5, seed=2), noise(5, seed=3)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    seen = {}

    def velocity(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss, t_out = FlowMatchingLoss()(velocity, data, t=t, noise=z)
    tt = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], (1 - tt) * z + tt * data, rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, (data - z).pow(2).flatten(1).mean(1), rtol=1e-14, atol=0)
    assert t_out is t


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_loss_at_the_exact_field_is_the_conditional_variance(t):
    n = 40000
    data = MU + S * noise(n, seed=4)
    loss, _ = FlowMatchingLoss()(exact_velocity(), data, t=torch.full((n,), t, dtype=torch.float64),
                                 generator=gen(5))
    var = (1 - t) ** 2 + t**2 * S**2
    expected = (1 + S**2) - (t * S**2 - (1 - t)) ** 2 / var
    # the mean of 160000 squared Gaussians: within 2% (about 7 standard errors)
    assert abs(float(loss.mean()) / expected - 1) < 0.02
    # any other field does worse
    worse, _ = FlowMatchingLoss()(lambda x, tt: exact_velocity()(x, tt) + 0.1, data,
                                  t=torch.full((n,), t, dtype=torch.float64), generator=gen(5))
    assert float(worse.mean()) > float(loss.mean()) + 0.009


def test_time_sampling():
    like = torch.zeros(1, dtype=torch.float64)
    uniform = FlowMatchingLoss().sample_times(20000, like, gen(0))
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01  # 5 standard errors (0.289 / sqrt(20000) = 0.002)
    logit = FlowMatchingLoss(time_sampling="logit_normal", logit_mean=0.5, logit_std=1.2).sample_times(20000, like,
                                                                                                      gen(0))
    z = torch.logit(logit)
    assert abs(float(z.mean()) - 0.5) < 0.045 and abs(float(z.std()) - 1.2) < 0.036


# ----------------------------------------------------------------- minibatch OT
def test_ot_pairing_is_the_exact_minimum_over_permutations():
    data, z = noise(6, seed=6), noise(6, seed=7)

    def cost(perm):
        return float(((data - z[list(perm)]) ** 2).sum())

    best = min(itertools.permutations(range(6)), key=cost)
    perm = ot_pairing(z, data)
    assert sorted(perm.tolist()) == list(range(6))
    assert cost(perm.tolist()) == pytest.approx(cost(best), rel=1e-12)
    assert cost(perm.tolist()) <= cost(range(6))


def test_ot_coupling_permutes_the_noise_and_keeps_labels_with_their_images():
    data, z = noise(8, seed=8), noise(8, seed=9)
    labels = torch.arange(8)
    seen = {}

    def velocity(x, t, y):
        seen["x"], seen["y"] = x, y
        return torch.zeros_like(x)

    t = torch.full((8,), 0.0, dtype=torch.float64)  # at t = 0 x_t is the (paired) noise itself
    FlowMatchingLoss(coupling="ot")(velocity, data, labels, t=t, noise=z)
    assert seen["y"] is labels
    torch.testing.assert_close(seen["x"], z[ot_pairing(z, data)], rtol=0, atol=0)
    # straighter pairs: the OT pairs are on average closer than the independent ones
    paired = ((data - seen["x"]) ** 2).sum()
    assert float(paired) <= float(((data - z) ** 2).sum())


# ----------------------------------------------------------------- the samplers
@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_samplers_transport_noise_to_the_gaussian_data_at_their_order(method, order):
    z = noise()
    exact = exact_map(z, 0.0)
    errors = {}
    for steps in (16, 32, 64):
        sampler = FlowSampler(method, steps)
        out = sampler.sample(exact_velocity(), z)
        assert sampler.last_nfe == sampler.nfe() == steps * (1 if method == "euler" else 2)
        errors[steps] = float((out - exact).abs().max())
    # Halving h divides the error by at least about 2^order. Measured max |error| at 16 / 32 / 64 steps:
    # euler 0.127 / 0.065 / 0.033 (ratio 1.95), heun 5.1e-3 / 1.4e-3 / 3.6e-4 (3.7, 3.8), midpoint
    # 1.7e-4 / 2.1e-5 / 2.7e-6 (7.9, 8.0: this field's second-order error term happens to vanish)
    for a, b in ((16, 32), (32, 64)):
        assert errors[a] / errors[b] > 2**order * 0.8, errors
        if order == 1:
            assert errors[a] / errors[b] < 2.5, errors
    out = FlowSampler(method, 32).sample(exact_velocity(), noise(20000, seed=10))
    # 80000 values: mean within 0.01 (9 standard errors of 0.001) plus the method's error, std within 3%
    assert abs(float(out.mean()) - MU) < 0.01 + errors[32]
    assert abs(float(out.std()) / S - 1) < 0.03 + errors[32] / S


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_variation_integrates_from_an_intermediate_time(method):
    data = MU + S * noise(64, seed=11)
    sampler = FlowSampler(method, 40)
    seen = []
    out = sampler.vary(exact_velocity(), data, strength=0.25, generator=gen(12), callback=seen.append)
    start = sampler.start_for(0.25)
    t0 = sampler.times()[start]
    assert start == 30 and t0 == 0.75 and [info["i"] for info in seen] == list(range(30, 40))
    assert seen[-1]["nfe"] == sampler.nfe(start) == (10 if method == "euler" else 20)
    z = torch.randn(data.shape, generator=gen(12)).double()
    x_t0 = (1 - t0) * z + t0 * data
    tol = 5e-2 if method == "euler" else 1e-3  # 10 steps; measured 0.037 (euler), 2.8e-4 (heun)
    torch.testing.assert_close(out, exact_map(x_t0, t0), rtol=0, atol=tol)
    # a weak variation stays near its input
    assert float((out - data).abs().mean()) < float((exact_map(z, 0.0) - data).abs().mean())


def test_replacement_inpainting_pastes_the_known_region():
    known = MU + S * noise(4, seed=13)
    mask = torch.zeros_like(known)
    mask[..., 0] = 1
    region = KnownRegionFlow(known, mask, gen(0))
    times = []

    def after_step(x, t):
        times.append(t)
        return region.paste(x, t)

    out = FlowSampler("heun", 5).sample(exact_velocity(), noise(4, seed=14), after_step=after_step)
    assert times == [0.2, 0.4, 0.6, 0.8, 1.0]
    torch.testing.assert_close(out * mask, known * mask, rtol=0, atol=0)


def test_flow_velocity_scales_time_for_the_net_and_passes_labels():
    seen = {}

    class Net(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y=None):
            seen["t"], seen["y"] = t, y
            return x * 0

    v = FlowVelocity(Net(), time_scale=1000)
    x = noise(3)
    v(x, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(seen["t"], torch.tensor([0.0, 500.0, 1000.0], dtype=torch.float64))
    assert seen["y"].tolist() == [1, 2, 3] and v.num_classes == 10
    v(x, 0.25)
    torch.testing.assert_close(seen["t"], torch.full((3,), 250.0, dtype=torch.float64))
    assert seen["y"] is None


@pytest.mark.parametrize("build, match", [
    (lambda: FlowSampler("rk4", 10), "sampler.method='rk4'"),
    (lambda: FlowSampler("euler", 0), "sampler.steps=0"),
    (lambda: FlowMatchingLoss(coupling="sinkhorn"), "model.coupling='sinkhorn'"),
    (lambda: FlowMatchingLoss(time_sampling="beta"), "model.time_sampling='beta'"),
    (lambda: FlowVelocity(torch.nn.Identity(), time_scale=0), "model.time_scale=0"),
    (lambda: FlowSampler("euler", 4).vary(exact_velocity(), noise(2), strength=1.5), "strength=1.5"),
])
def test_bad_settings_are_refused_by_name(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_flow_mlp_trains_on_gaussian_data_and_samples_it():
    """The pieces together on gencli's MLP denoiser (float32): the loss trains it, Heun samples the data."""
    from gencli.nets.mlp import MLPDenoiser

    torch.manual_seed(0)
    mu, sd = torch.tensor([0.5, -0.3]), 0.2
    g = gen(0)
    model = FlowVelocity(MLPDenoiser(2, hidden=64, depth=2, time_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = FlowMatchingLoss(coupling="ot")
    for _ in range(300):
        loss, _ = loss_fn(model, mu + sd * torch.randn(128, 2, generator=g), generator=g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    sampler = FlowSampler("heun", 10)
    out = sampler.sample(model, torch.randn(4000, 2, generator=gen(1)))
    assert sampler.last_nfe == 20
    # measured (400 steps, independent coupling): mean (0.51, -0.31), std (0.20, 0.20)
    assert (out.mean(0) - mu).abs().max() < 0.06
    assert ((out.std(0) / sd - 1).abs() < 0.25).all()
