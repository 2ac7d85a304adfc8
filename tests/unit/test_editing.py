"""Inpainting (RePaint, replacement), SDEdit variations, masks and the editing metrics, on stand-in denoisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gencli.diffusion import editing
from gencli.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2M, HeunSampler
from gencli.diffusion.schedule import NoiseSchedule
from gencli.errors import ConfigError
from gencli.latents import slerp_rows
from gencli.masks import make_masks, mask_from_file
from gencli.metrics.editing import PerceptualPathLength, masked_scores
from gencli.seeds import PerImageGenerator

T = 1000


def reference_schedule_jump(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's get_schedule_jump (guided_diffusion/scheduler.py, without its unused options), transcribed."""
    jumps = {}
    for j in range(0, t_T - jump_length, jump_length):
        jumps[j] = jump_n_sample - 1
    t = t_T
    ts = []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


def image(n=4, seed=0, size=8):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def oracle(schedule: NoiseSchedule, truth: torch.Tensor):
    """A perfect denoiser for one known data point: x0_hat = the truth; eps_hat follows from x_t."""

    def denoise(x, t, clip):
        alpha_bar = schedule.alpha_bar_at(t, x)
        return truth, (x - alpha_bar.sqrt() * truth) / (1 - alpha_bar).sqrt()

    return denoise


def blind(schedule: NoiseSchedule):
    """A denoiser that knows nothing: eps_hat = 0.3 x_t."""

    def denoise(x, t, clip):
        return schedule.split_prediction("eps", 0.3 * x, x, t, clip_x0=clip)

    return denoise


# ----------------------------------------------------------------- RePaint's walk
@pytest.mark.parametrize(("n", "length", "resample"), [(250, 10, 10), (50, 5, 3), (20, 10, 2), (7, 10, 10), (30, 3, 1)])
def test_repaint_walk_is_the_reference_schedule(n, length, resample):
    walk = editing.repaint_schedule(n, length, resample)
    assert walk == reference_schedule_jump(n, length, resample)
    assert walk[0] == n - 1 and walk[-1] == -1 and all(abs(a - b) == 1 for a, b in zip(walk, walk[1:]))


def test_repaint_network_evaluations():
    schedule = NoiseSchedule("linear", T)
    sampler = DDPMSampler(steps=250)
    # 250 steps down, plus 9 resamplings of 10 steps at each of the 24 jump points
    assert editing.inpaint_nfe("repaint", sampler, schedule, 10, 10) == 250 + 24 * 9 * 10
    assert editing.inpaint_nfe("replace", HeunSampler(steps=10), schedule, 10, 10) == 19


# ----------------------------------------------------------------- inpainting
@pytest.mark.parametrize(("method", "sampler"), [("repaint", DDPMSampler(steps=20)), ("repaint", DDIMSampler(steps=20)),
                                                 ("replace", DDIMSampler(steps=20)), ("replace", DPMSolverPP2M(steps=8)),
                                                 ("replace", HeunSampler(steps=6))])
def test_known_pixels_are_kept_and_an_oracle_recovers_the_rest(method, sampler):
    schedule = NoiseSchedule("linear", T)
    truth = image()
    mask = make_masks("center", 4, (8, 8)).double()
    generator = PerImageGenerator.for_range(0, 0, 4)
    x_T = torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = editing.inpaint(oracle(schedule, truth), schedule, sampler, truth, mask, x_T, generator, method, 5, 3)
    assert torch.equal(out[mask.expand_as(out) == 1], truth[mask.expand_as(out) == 1])
    assert torch.allclose(out, truth, atol=1e-9)  # the oracle knows the hidden pixels too
    blind_out = editing.inpaint(blind(schedule), schedule, sampler, truth, mask, x_T, generator, method, 5, 3)
    assert torch.equal(blind_out[mask.expand_as(out) == 1], truth[mask.expand_as(out) == 1])
    assert not torch.allclose(blind_out, truth, atol=1e-2)


def test_inpainting_noise_is_per_image():
    """Image 2's fill depends on (seed, 2) only, not on which images share its batch."""
    schedule = NoiseSchedule("linear", T)
    truth, mask = image(), make_masks("left", 4, (8, 8)).double()
    sampler = DDPMSampler(steps=10)

    def fill(rows, start):
        generator = PerImageGenerator.for_range(7, start, len(rows))
        x_T = torch.stack([torch.randn(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                           for i in range(start, start + len(rows))])
        return editing.inpaint(blind(schedule), schedule, sampler, truth[rows], mask[rows], x_T, generator,
                               "repaint", 3, 2)

    whole = fill(list(range(4)), 0)
    alone = fill([2], 2)
    torch.testing.assert_close(whole[2:3], alone, rtol=0, atol=1e-12)


def test_repaint_refuses_a_multistep_solver_and_bad_settings():
    with pytest.raises(ConfigError, match="sampler=ddpm or sampler=ddim"):
        editing.check_inpaint("repaint", DPMSolverPP2M(), 10, 10)
    editing.check_inpaint("replace", DPMSolverPP2M(), 10, 10)
    with pytest.raises(ConfigError, match="inpaint.method='blend'"):
        editing.check_inpaint("blend", DDIMSampler(), 10, 10)
    with pytest.raises(ConfigError, match="jump_length=0"):
        editing.check_inpaint("repaint", DDIMSampler(), 0, 10)


# ----------------------------------------------------------------- variations
@pytest.mark.parametrize("sampler", [DDIMSampler(steps=20), DPMSolverPP2M(steps=20), HeunSampler(steps=10)])
def test_sdedit_starts_at_the_strength_and_an_oracle_returns_the_input(sampler):
    schedule = NoiseSchedule("linear", T)
    truth = image()
    out = editing.vary(oracle(schedule, truth), schedule, sampler, truth, 0.4, PerImageGenerator.for_range(0, 0, 4))
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-9)
    info = editing.variation_info(sampler, schedule, 0.4)
    n = len(sampler.levels(schedule))
    assert info["start_step"] == n - round(0.4 * n)
    weak = editing.vary(blind(schedule), schedule, sampler, truth, 0.05, PerImageGenerator.for_range(0, 0, 4))
    strong = editing.vary(blind(schedule), schedule, sampler, truth, 1.0, PerImageGenerator.for_range(0, 0, 4))
    assert (weak - truth).abs().mean() < (strong - truth).abs().mean()
    with pytest.raises(ConfigError, match="strength=0"):
        editing.check_strength(0)


# ----------------------------------------------------------------- masks
def test_mask_kinds():
    assert float(1 - make_masks("center", 2, (32, 32)).mean()) == 0.25
    left = make_masks("left", 1, (8, 8))
    assert left[0, 0, :, :4].sum() == 0 and left[0, 0, :, 4:].min() == 1
    random = make_masks("random", 5, (32, 32), seed=3)
    assert all(0.05 < float(1 - m.mean()) < 0.4 for m in random)
    torch.testing.assert_close(random[2:4], make_masks("random", 2, (32, 32), seed=3, start=2))  # per image
    assert not torch.equal(random, make_masks("random", 5, (32, 32), seed=4))


def test_mask_files_are_white_where_to_fill(tmp_path):
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[:, 8:] = 255
    Image.fromarray(pixels).save(tmp_path / "right.png")
    mask = mask_from_file(str(tmp_path / "right.png"), (8, 8))
    assert mask[0, 0, :, :4].min() == 1 and mask[0, 0, :, 4:].max() == 0
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(ConfigError, match="white everywhere"):
        mask_from_file(str(tmp_path / "white.png"), (8, 8))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        mask_from_file(str(tmp_path / "broken.png"), (8, 8))
    with pytest.raises(ConfigError, match="neither a mask kind"):
        make_masks("middle", 1, (8, 8))


# ----------------------------------------------------------------- metrics
def test_masked_scores_look_only_at_the_filled_region():
    original = image(2, size=16).float()
    mask = make_masks("center", 2, (16, 16))
    perfect = masked_scores(original, original, mask, 7)
    assert torch.all(perfect["psnr"] == 100) and torch.allclose(perfect["ssim"], torch.ones(2))
    off = original.clone()
    off = torch.where(mask == 0, (original + 0.2).clamp(-1, 1), original + 0.5)  # known region: ignored
    inside = (1 - mask).expand_as(original).bool()
    expected_mse = (((off - original) / 2)[inside]).pow(2).reshape(2, -1).mean(1)
    scores = masked_scores(off, original, mask, 7)
    torch.testing.assert_close(scores["mse"], expected_mse.to(scores["mse"]))
    torch.testing.assert_close(scores["psnr"], 10 * torch.log10(1 / expected_mse).to(scores["psnr"]))


class LinearLatentModel:
    """A stand-in latent family: G(z) = scale * z reshaped to a 1x4x4 image."""

    has_latent = True

    def __init__(self, scale: float):
        self.scale = scale

    def prior(self, n, generator):
        return generator.randn((n, 16), dtype=torch.float64)

    def decode(self, z, **options):
        return self.scale * z.reshape(-1, 1, 4, 4)

    def sampling_info(self, **options):
        return {"family": "linear"}


class PixelFeatures:
    def prepare(self, datamodule, device):
        pass

    def extract(self, images):
        return images.flatten(1), None

    def describe(self):
        return {"name": "pixels"}


def test_ppl_scales_with_the_decoder_and_matches_slerp_speed(tmp_path):
    from gencli.metrics.base import EvalContext

    def ppl(scale, n=64):
        ctx = EvalContext(model=LinearLatentModel(scale), datamodule=object(), split="val", n=n, batch_size=n, seed=0,
                          device=torch.device("cpu"), out_dir=tmp_path, features=PixelFeatures())
        return PerceptualPathLength(epsilon=1e-4, percentiles=(0, 100))(ctx).values["ppl_domain"]

    assert ppl(2.0) == pytest.approx(4 * ppl(1.0), rel=1e-6)
    # for G = identity, |d slerp / dt|^2 averages to omega^2 |z|^2 for unit-norm-matched pairs: check one pair
    z0, z1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    t, eps = torch.tensor([0.3], dtype=torch.float64), 1e-6
    speed = (slerp_rows(z0, z1, t + eps) - slerp_rows(z0, z1, t)).pow(2).sum() / eps**2
    assert float(speed) == pytest.approx((math.pi / 2) ** 2, rel=1e-4)


def test_ppl_settings_are_config_errors():
    with pytest.raises(ConfigError, match="ppl.epsilon"):
        PerceptualPathLength(epsilon=0)
    with pytest.raises(ConfigError, match="ppl.distance"):
        PerceptualPathLength(distance="l1")
    with pytest.raises(ConfigError, match="ppl.percentiles"):
        PerceptualPathLength(percentiles=(50, 10))
