"""Min-SNR-gamma (gencli.diffusion.loss_weighting): each weight against the paper's formula, and the identity it
rests on: the weighted loss in every parametrisation equals min(SNR, gamma) ||x0_hat - x_0||^2, with x0_hat obtained
from the network's output by the schedule's own conversion (NoiseSchedule.split_prediction), in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gencli.diffusion.loss_weighting import LossWeighting, min_snr_weight, snr
from gencli.diffusion.schedule import ConfigError, NoiseSchedule

SCHEDULES = [NoiseSchedule("linear", 1000), NoiseSchedule("cosine", 1000), NoiseSchedule("linear", 100)]


def timesteps(schedule, n=64, seed=0):
    t = torch.randint(0, schedule.timesteps, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([t, torch.tensor([0, schedule.timesteps - 1])])  # both ends


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_weights_are_the_papers_formula(schedule, gamma):
    t = timesteps(schedule)
    like = torch.zeros(len(t), 1, dtype=torch.float64)
    a = schedule.alphas_cumprod.numpy()[t.numpy()]  # by hand, in numpy
    snr_np = a / (1 - a)
    clipped = np.minimum(snr_np, gamma)
    expected = {"eps": clipped / snr_np, "v": clipped / (snr_np + 1), "x0": clipped}
    weighting = LossWeighting("min_snr", gamma)
    for prediction, w in expected.items():
        np.testing.assert_allclose(weighting(schedule, prediction, t, like).numpy(), w, rtol=1e-12)
        # the family's current min_snr_gamma path computes the same weights
        torch.testing.assert_close(schedule.min_snr_weight(prediction, t, gamma, like),
                                   weighting(schedule, prediction, t, like), rtol=1e-12, atol=0)
    # eps: 1 up to SNR = gamma, then gamma / SNR; never above 1
    eps_w = expected["eps"]
    assert np.all(eps_w <= 1) and np.all(eps_w[snr_np <= gamma] == 1)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_weighted_loss_is_the_same_x0_space_loss_in_every_parametrisation(schedule, prediction):
    g = torch.Generator().manual_seed(1)
    t = timesteps(schedule, seed=2)
    x0 = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, eps)
    target = schedule.target(prediction, x0, eps, t)
    out = target + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect network
    gamma = 5.0
    weighted = LossWeighting("min_snr", gamma)(schedule, prediction, t, x0) * (out - target).pow(2).flatten(1).mean(1)
    x0_hat, _ = schedule.split_prediction(prediction, out, x_t, t)
    s = snr(schedule, t, x0)
    in_x0_space = s.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, in_x0_space, rtol=1e-9, atol=1e-12)


def test_the_eps_formula_reused_for_v_is_wrong():
    """diffusers #5654: weighting v-prediction by min(SNR, gamma) / SNR breaks the identity above."""
    schedule = SCHEDULES[0]
    t = timesteps(schedule, seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(len(t), 8, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    target = schedule.target("v", x0, eps, t)
    out = target + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat, _ = schedule.split_prediction("v", out, schedule.q_sample(x0, t, eps), t)
    s = snr(schedule, t, x0)
    right = s.clamp(max=5) * (x0_hat - x0).pow(2).mean(1)
    wrong = min_snr_weight(s, "eps", 5.0) * (out - target).pow(2).mean(1)
    assert not torch.allclose(wrong, right, rtol=1e-3)


def test_fractional_timesteps_and_no_weighting():
    schedule = SCHEDULES[0]
    like = torch.zeros(3, dtype=torch.float64)
    t = torch.tensor([10.0, 10.5, 11.0], dtype=torch.float64)
    s = snr(schedule, t, like)
    assert float(s[0]) > float(s[1]) > float(s[2])  # between its neighbours
    a = 1 / (1 + schedule.sigma_at(10.5) ** 2)
    assert float(s[1]) == pytest.approx(a / (1 - a), rel=1e-12)
    ones = LossWeighting("none")(schedule, "v", t, like)
    assert ones.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("build, match", [
    (lambda: LossWeighting("p2"), "model.loss_weighting='p2'"),
    (lambda: LossWeighting("min_snr", 0), "model.gamma=0"),
    (lambda: LossWeighting("min_snr", float("inf")), "model.gamma=inf"),
    (lambda: LossWeighting("min_snr")(SCHEDULES[0], "score", torch.zeros(1, dtype=torch.long), torch.zeros(1)),
     "model.prediction='score'"),
    (lambda: LossWeighting("none")(SCHEDULES[0], "score", torch.zeros(1, dtype=torch.long), torch.zeros(1)),
     "model.prediction='score'"),
])
def test_bad_settings_are_refused_by_name(build, match):
    with pytest.raises(ConfigError, match=match):
        build()
