"""PSNR, SSIM (RGB and Y) and downscale consistency against hand computations (issue 26)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gencli.metrics.image_quality import (
    ConfigError,
    downscale_consistency,
    image_quality,
    psnr,
    rgb_to_y,
    ssim,
)


def unit(*shape, seed=0) -> torch.Tensor:
    """Smooth-ish random images in [0, 1] (structure for SSIM to see)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=torch.float64)
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


def hand_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two gray images in [0, 1] written out: every 11x11 window inside the image, Gaussian weights
    w (sigma 1.5, summing to 1), mu = sum w x, sigma^2 = sum w (x - mu)^2, sigma_xy = sum w (x - mu_x)(y - mu_y)."""
    r = np.arange(-5, 6)
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i: i + 11, j: j + 11], y[i: i + 11, j: j + 11]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_psnr_by_hand():
    target = torch.full((1, 1, 4, 4), 100 / 255, dtype=torch.float64)
    pred = target.clone()
    pred[0, 0, 0, :2] += 8 / 255  # two pixels 8 levels off: MSE = 2 * 64 / 16 levels^2
    want = 10 * math.log10(255**2 / (2 * 64 / 16))
    assert float(psnr(pred, target, value_range=(0, 1))[0]) == pytest.approx(want, abs=1e-9)
    # every pixel one level off: 20 log10(255) = 48.13 dB, in gencli's [-1, 1] range too
    one_level = psnr(target * 2 - 1 + 2 / 255, target * 2 - 1)
    assert float(one_level[0]) == pytest.approx(20 * math.log10(255), abs=1e-6)
    assert math.isinf(float(psnr(target, target, value_range=(0, 1))[0]))


def test_psnr_is_per_image_and_matches_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    target, pred = unit(3, 3, 16, 16, seed=1), unit(3, 3, 16, 16, seed=2)
    pred[1] = target[1] + 0.01  # one good image: the mean of per-image PSNRs is not the PSNR of the pooled MSE
    mine = psnr(pred, target, value_range=(0, 1), quantize=False)
    theirs = peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none")
    assert torch.allclose(mine, theirs.double(), atol=1e-6)
    pooled = peak_signal_noise_ratio(pred, target, data_range=1.0)
    assert float(mine.mean()) > float(pooled) + 5


def test_ssim_by_hand_on_a_tiny_pair():
    """A 12x13 pair: a 2x3 map of valid windows, each computed step by step in numpy."""
    rng = np.random.default_rng(5)
    x = rng.random((12, 13))
    y = np.clip(x + 0.2 * rng.standard_normal((12, 13)), 0, 1)
    got = ssim(torch.from_numpy(y)[None, None], torch.from_numpy(x)[None, None], value_range=(0, 1), quantize=False)
    assert float(got[0]) == pytest.approx(hand_ssim(y, x), abs=1e-12)
    same = torch.from_numpy(x)[None, None]
    assert float(ssim(same, same, value_range=(0, 1))[0]) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_the_skimage_algorithm_with_scipy():
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1), the setting its docs give for Wang et al.'s implementation, re-done with scipy's filter:
    Gaussian filtering truncated at 3.5 sigma (11 taps), then the border of 5 cropped. RGB: the channel mean."""
    ndimage = pytest.importorskip("scipy.ndimage")
    pred, target = unit(2, 3, 24, 20, seed=3), unit(2, 3, 24, 20, seed=4)
    pred = 0.5 * pred + 0.5 * target
    got = ssim(pred, target, value_range=(0, 1), quantize=False)
    for n in range(2):
        per_channel = []
        for c in range(3):
            a, b = pred[n, c].numpy(), target[n, c].numpy()
            f = lambda v: ndimage.gaussian_filter(v, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
            ma, mb = f(a), f(b)
            va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
            s = ((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4))
            per_channel.append(s[5:-5, 5:-5].mean())
        assert float(got[n]) == pytest.approx(float(np.mean(per_channel)), abs=1e-10)


def test_y_channel_by_hand():
    """BT.601 studio range (MATLAB rgb2ycbcr): white -> 235, black -> 16, pure red -> 16 + 65.481 levels."""
    colours = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0.2, 0.4, 0.6]], dtype=torch.float64)
    y = rgb_to_y(colours.view(4, 3, 1, 1)).flatten() * 255
    want = [235.0, 16.0, 16 + 65.481, 16 + 0.2 * 65.481 + 0.4 * 128.553 + 0.6 * 24.966]
    assert torch.allclose(y, torch.tensor(want, dtype=torch.float64), atol=1e-3)
    red, black = torch.zeros(1, 3, 12, 12, dtype=torch.float64), torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    red[:, 0] = 1
    assert float(psnr(red, black, y_channel=True, value_range=(0, 1))[0]) == pytest.approx(
        20 * math.log10(255 / 65.481), abs=1e-9)
    # RGB PSNR of the same pair: one channel of three off by 255 levels
    assert float(psnr(red, black, value_range=(0, 1))[0]) == pytest.approx(10 * math.log10(3), abs=1e-9)
    # SSIM on Y is SSIM of the luma images
    pred, target = unit(1, 3, 16, 16, seed=6), unit(1, 3, 16, 16, seed=7)
    y_pred, y_target = rgb_to_y(pred), rgb_to_y(target)
    assert float(ssim(pred, target, y_channel=True, value_range=(0, 1), quantize=False)[0]) == pytest.approx(
        hand_ssim(y_pred[0, 0].numpy(), y_target[0, 0].numpy()), abs=1e-12)
    # a gray image is its own Y
    gray = unit(2, 1, 12, 12, seed=8)
    assert torch.equal(psnr(gray, gray.flip(-1), y_channel=True), psnr(gray, gray.flip(-1)))


def test_quantize_and_crop_border():
    target = (unit(1, 3, 16, 16, seed=9) * 255).round() / 255 * 2 - 1  # an 8-bit image
    assert math.isinf(float(psnr(target + 0.3 / 255, target)[0]))  # under half a level: the same PNG
    assert not math.isinf(float(psnr(target + 0.3 / 255, target, quantize=False)[0]))
    border = target.clone()
    border[..., 0, :] = -border[..., 0, :]
    assert math.isinf(float(psnr(border, target, crop_border=1)[0]))
    assert not math.isinf(float(psnr(border, target)[0]))
    with pytest.raises(ConfigError, match="SSIM needs images of at least 11x11"):
        ssim(target, target, crop_border=3)
    with pytest.raises(ConfigError, match="one shape"):
        psnr(target, target[..., :8])
    values = image_quality(target[:, :, :8, :8], target[:, :, :8, :8])
    assert set(values) == {"psnr", "psnr_y"}  # SSIM left out below 11x11
    assert set(image_quality(target, target)) == {"psnr", "psnr_y", "ssim", "ssim_y"}


def test_downscale_consistency():
    low = unit(2, 3, 8, 8, seed=10) * 2 - 1
    up = low.repeat_interleave(4, -2).repeat_interleave(4, -1)  # nearest upsampling: its block means are low
    assert float(downscale_consistency(up, low, 4).max()) < 1e-30  # 0 up to the rounding of a mean of 16 equal values
    # detail that averages to zero in every 4x4 block keeps it consistent; a shift of 0.1 does not
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.2 - 0.1
    assert torch.allclose(downscale_consistency(up + checker, low, 4), torch.zeros(2, dtype=torch.float64))
    shifted = downscale_consistency(up + 0.1, low, 4)
    assert torch.allclose(shifted, torch.full((2,), (0.1 / 2) ** 2, dtype=torch.float64))  # [0, 1] units
    assert float(downscale_consistency(up, low, 4, method="bicubic").max()) > 0
    with pytest.raises(ConfigError, match="must then be 2x3x8x8"):
        downscale_consistency(up, low[..., :4, :4], 4)
    with pytest.raises(ConfigError, match="multiples of 8"):
        downscale_consistency(up[..., :28, :28], low, 8)
