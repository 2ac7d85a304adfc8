"""DPM-Solver++(2M) and Heun against diffusers' schedulers, an independent implementation.

diffusers keeps its tables in float32, so the comparisons come in two kinds:
- the noise levels and timesteps each sampler visits, against diffusers' ``set_timesteps``, to float32 rounding
  (rtol 5e-4: near t = 0, 1 - alpha_bar ~ 1e-4 loses most of float32's digits to cancellation);
- the arithmetic of every step, in float64 with diffusers' tables replaced by float64 ones computed the same way,
  to float64 rounding (relative 1e-11 over a whole trajectory). For DPM-Solver++ diffusers' ``step`` casts the sample
  to float32, so its own update functions are driven step by step here, in the order ``step`` calls them;
  a second test runs ``step`` itself in float32 to check that order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gencli.diffusion.samplers import DDIMSampler, DPMSolverPP2M, HeunSampler, karras_sigmas
from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only reference (pip install -e '.[test]')")

T = 1000
#: float32 tables against float64 ones (see the module docstring)
F32 = 5e-4
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def fake_output(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A deterministic stand-in network, smooth in x and t (the same function feeds both implementations)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * torch.tanh(x) + 0.1 * torch.cos(x * 3) + 0.05 * t / T


def our_denoiser(schedule: NoiseSchedule, prediction: str):
    def denoise(x, t, clip):
        return schedule.split_prediction(prediction, fake_output(x, t.to(torch.float64)), x, t, clip_x0=clip)

    return denoise


def x_T(seed=0):
    return torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference(cls, schedule: NoiseSchedule, prediction: str = "eps", **config):
    return cls(num_train_timesteps=schedule.timesteps, trained_betas=schedule.betas.numpy(),
               prediction_type=DIFFUSERS_PREDICTION[prediction], **config)


# ----------------------------------------------------------------- the levels visited
@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpm_solver_visits_diffusers_timesteps_and_sigmas(spacing, steps):
    schedule = NoiseSchedule("linear", T)
    ours = DPMSolverPP2M(steps=steps, spacing=spacing)
    ref = reference(diffusers.DPMSolverMultistepScheduler, schedule, timestep_spacing=spacing)
    ref.set_timesteps(timesteps=ours.timesteps(schedule))  # diffusers' linspace/leading place steps+1 points; same set here
    assert ref.timesteps.tolist() == ours.timesteps(schedule)
    np.testing.assert_allclose(ours.level_sigmas(schedule), ref.sigmas.double().numpy(), rtol=F32)
    if spacing == "trailing":  # the only spacing both define the same way for a step count alone
        ref.set_timesteps(num_inference_steps=steps)
        assert ref.timesteps.tolist() == ours.timesteps(schedule)


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_karras_sigmas_match_diffusers(steps):
    schedule = NoiseSchedule("linear", T)
    heun = HeunSampler(steps=steps, spacing="linspace", sigmas="karras")
    ref = reference(diffusers.HeunDiscreteScheduler, schedule, use_karras_sigmas=True, timestep_spacing="linspace")
    ref.set_timesteps(steps)
    np.testing.assert_allclose(heun.level_sigmas(schedule)[:-1], ref.sigmas[::2].double().numpy(), rtol=F32)
    assert heun.level_sigmas(schedule)[-1] == ref.sigmas[-1] == 0
    # the fractional timesteps the network sees (diffusers doubles every one after the first)
    np.testing.assert_allclose(heun.levels(schedule), ref.timesteps[::2].double().numpy(), rtol=F32, atol=2e-3)
    dpm = DPMSolverPP2M(steps=steps, sigmas="karras")
    ref = reference(diffusers.DPMSolverMultistepScheduler, schedule, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(dpm.level_sigmas(schedule), ref.sigmas.double().numpy(), rtol=F32)
    # diffusers rounds these timesteps (its network sees t and sigma that disagree); ours keeps them fractional
    np.testing.assert_allclose(dpm.levels(schedule), ref.timesteps.double().numpy(), atol=0.5 + 1e-6)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_heun_visits_diffusers_timesteps(spacing):
    schedule = NoiseSchedule("cosine", T)
    heun = HeunSampler(steps=10, spacing=spacing)
    ref = reference(diffusers.HeunDiscreteScheduler, schedule, timestep_spacing=spacing)
    ref.set_timesteps(10)
    assert ref.timesteps[::2].tolist() == heun.levels(schedule)
    np.testing.assert_allclose(heun.level_sigmas(schedule)[:-1], ref.sigmas[::2].double().numpy(), rtol=F32)
    assert heun.level_sigmas(schedule)[-1] == ref.sigmas[-1] == 0


def test_schedule_sigma_interpolation_round_trips():
    schedule = NoiseSchedule("linear", T)
    for t in (0.0, 3.25, 10.5, 500.0, 998.9, 999.0):
        assert schedule.t_of_sigma(schedule.sigma_at(t)) == pytest.approx(t, abs=1e-9)
    assert schedule.sigma_at(17) == float(schedule.sigmas[17])
    x = torch.zeros(2, 1)
    assert schedule.alpha_bar_at(torch.tensor([17, 17]), x)[0].item() == pytest.approx(float(schedule.alphas_cumprod[17]))
    frac = schedule.alpha_bar_at(torch.tensor([17.5, 17.5], dtype=torch.float64), x)[0].item()
    assert float(schedule.alphas_cumprod[18]) < frac < float(schedule.alphas_cumprod[17])


def test_karras_sigmas_are_the_papers_formula():
    sig = karras_sigmas(0.002, 80.0, 18)
    assert sig[0] == pytest.approx(80.0) and sig[-1] == pytest.approx(0.002)
    i = 5
    assert sig[i] == pytest.approx((80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)


# ----------------------------------------------------------------- step arithmetic, float64
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(("steps", "sigmas", "kind"), [(10, "discrete", "linear"), (20, "discrete", "cosine"),
                                                        (16, "karras", "linear"), (3, "discrete", "linear")])
def test_dpm_solver_steps_match_diffusers_in_float64(prediction, steps, sigmas, kind):
    schedule = NoiseSchedule(kind, T)
    ours = DPMSolverPP2M(steps=steps, sigmas=sigmas, clip_denoised=False)
    got = ours.sample(our_denoiser(schedule, prediction), schedule, x_T())

    ref = reference(diffusers.DPMSolverMultistepScheduler, schedule, prediction,
                    use_karras_sigmas=sigmas == "karras")
    ref.set_timesteps(timesteps=ours.timesteps(schedule)) if sigmas == "discrete" else ref.set_timesteps(steps)
    ref.sigmas = torch.tensor(ours.level_sigmas(schedule), dtype=torch.float64)  # float64 tables, same formula
    levels = ours.levels(schedule)
    x = x_T()
    for i in range(len(levels)):
        ref._step_index = i
        x0 = ref.convert_model_output(fake_output(x, levels[i]), sample=x)
        ref.model_outputs = [ref.model_outputs[-1], x0]
        first_order = i == 0 or i == len(levels) - 1  # as step(): no history yet; the step to sigma = 0
        x = (ref.dpm_solver_first_order_update(x0, sample=x) if first_order
             else ref.multistep_dpm_solver_second_order_update(ref.model_outputs, sample=x))
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-10)


@pytest.mark.parametrize("steps", [5, 14, 20])
def test_dpm_solver_matches_diffusers_step_in_float32(steps):
    """diffusers' own step() (float32): checks which steps are first order (the first; the last, to sigma = 0)."""
    schedule = NoiseSchedule("linear", T)
    ours = DPMSolverPP2M(steps=steps, clip_denoised=False)
    got = ours.sample(our_denoiser(schedule, "eps"), schedule, x_T())
    ref = reference(diffusers.DPMSolverMultistepScheduler, schedule)
    ref.set_timesteps(timesteps=ours.timesteps(schedule))
    x = x_T().float()
    for t in ref.timesteps:
        x = ref.step(fake_output(x, float(t)), t, x).prev_sample
    torch.testing.assert_close(got.float(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(("steps", "sigmas", "spacing"), [(10, "discrete", "trailing"), (12, "karras", "linspace"),
                                                           (4, "discrete", "linspace")])
def test_heun_steps_match_diffusers_in_float64(prediction, steps, sigmas, spacing):
    schedule = NoiseSchedule("linear", T)
    ours = HeunSampler(steps=steps, spacing=spacing, sigmas=sigmas, clip_denoised=False)
    got = ours.sample(our_denoiser(schedule, prediction), schedule, x_T())

    ref = reference(diffusers.HeunDiscreteScheduler, schedule, prediction, timestep_spacing=spacing,
                    use_karras_sigmas=sigmas == "karras")
    ref.set_timesteps(steps)
    sig = torch.tensor(ours.level_sigmas(schedule), dtype=torch.float64)
    ts = torch.tensor(ours.levels(schedule), dtype=torch.float64)
    ref.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    ref.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    x = x_T() * math.sqrt(1 + float(sig[0]) ** 2)  # x_T ~ N(0, I) in x_t's space, in sigma space
    for t in ref.timesteps:
        model_input = ref.scale_model_input(x, t)
        x = ref.step(fake_output(model_input, float(t)), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-10)
    assert ours.nfe(schedule) == len(ref.timesteps) == 2 * steps - 1


# ----------------------------------------------------------------- starting part-way, hooks, settings
@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DPMSolverPP2M(steps=10), HeunSampler(steps=10)])
def test_partial_runs_start_at_the_strength_and_call_after_step(sampler):
    schedule = NoiseSchedule("linear", T)
    start = sampler.start_for(schedule, 0.3)
    assert start == 7 and sampler.start_for(schedule, 1.0) == 0 and sampler.start_for(schedule, 0.01) == 9
    seen = []

    def after_step(x, alpha_bar_next):
        seen.append(alpha_bar_next)
        return x

    sampler.sample(our_denoiser(schedule, "eps"), schedule, x_T(), start=start, after_step=after_step)
    assert len(seen) == 3 and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    assert sampler.nfe(schedule, start) == (5 if isinstance(sampler, HeunSampler) else 3)


def test_fast_sampler_settings_are_config_errors():
    with pytest.raises(ConfigError, match="sampler.sigmas='exponential'"):
        DPMSolverPP2M(sigmas="exponential")
    with pytest.raises(ConfigError, match="sampler.steps=0"):
        HeunSampler(steps=0)
    with pytest.raises(ConfigError, match="sampler.spacing='uniform'"):
        HeunSampler(spacing="uniform")
