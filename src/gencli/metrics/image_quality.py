"""Full-reference image quality for image-to-image models (issue 26): PSNR, SSIM, and downscale consistency.

The maths only (per-image values on batches); the ``metric=sr`` / ``metric=translation`` plug-ins call these.
Conventions are those of the super-resolution papers' evaluation code (the MATLAB scripts of SRCNN/EDSR and
their Python port in BasicSR, ``basicsr/metrics``), so that numbers can be set beside published ones:

- images are compared as 8-bit images: values in ``value_range`` (gencli's [-1, 1]) are mapped to [0, 1] and,
  with ``quantize=True`` (the default), rounded to the 256 levels of the PNG a model's output is saved as;
- ``crop_border=s`` drops ``s`` pixels at each border first (SR papers crop the scale factor);
- each value is per image, and a data set's score is the mean of its images' values (not the PSNR of the
  pooled MSE);
- ``y_channel=True`` compares the luma Y of YCbCr, ITU-R BT.601 in its studio range as MATLAB's ``rgb2ycbcr``:
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1], so Y lies in [16/255, 235/255]
  and is compared with the same data range 1 (255 levels) as RGB, unrounded (BasicSR's ``test_y_channel``).
  A one-channel image is its own Y.

PSNR: ``10 log10(1 / MSE)`` on [0, 1] values (``20 log10(255 / RMSE)`` in 8-bit levels); +inf for identical images.

SSIM (Wang et al. 2004), the paper's and MATLAB ``ssim_index``'s definition: local means, variances and
covariance under an 11x11 Gaussian window of sigma 1.5 (normalised), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``
with ``L = 1``, the SSIM map over the windows that lie inside the image (a "valid" filter: an H x W image gives
(H - 10) x (W - 10) values), averaged over the map and the channels. The computation is torchmetrics'
``structural_similarity_index_measure`` (gaussian kernel, sigma 1.5 -> 11 taps), whose full SSIM map gencli
crops by the window's radius 5: torchmetrics' own average (1.9) also counts the border pixels, computed on
reflected padding, which the papers' definition leaves out -- on 32x32 images that is 53% of the map. Images
must be at least 11x11 after the crop.

Downscale consistency (SR3, Saharia et al. 2021, table 2): the mean squared error, on [0, 1] values, between
the output downscaled by the pairs' operator (:func:`gencli.data.pairs.downscale_images`, same factor and method,
no degradation) and the low-resolution input; 0 when the output is exactly consistent with its input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gencli.data.pairs import check_divisible, check_factor, downscale_images
from gencli.metrics.base import ConfigError  # gencli.errors.ConfigError, through an existing metrics module

#: BT.601 studio-swing luma (MATLAB rgb2ycbcr), for R, G, B in [0, 1] and Y in levels of 255.
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_SIGMA, SSIM_WINDOW, SSIM_K1, SSIM_K2 = 1.5, 11, 0.01, 0.03


def to_unit(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0), quantize: bool = True) -> Tensor:
    """Values in ``value_range`` -> float64 in [0, 1] (clamped), rounded to 8-bit levels with ``quantize``."""
    low, high = value_range
    x = ((x.detach().double() - low) / (high - low)).clamp(0, 1)
    return (x * 255).round() / 255 if quantize else x


def rgb_to_y(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) BT.601 studio-range luma in [16/255, 235/255]; 1 channel: as is."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ConfigError(f"the Y channel needs RGB (3-channel) or gray images; these have {x.shape[1]} channels.")
    weights = torch.tensor(Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * weights).sum(1, keepdim=True) + Y_OFFSET) / 255


def prepare(pred: Tensor, target: Tensor, *, y_channel: bool = False, crop_border: int = 0, quantize: bool = True,
            value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Both images as compared: [0, 1] float64, quantized, Y if asked, borders cropped."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ConfigError(f"outputs and targets must be image batches (N, C, H, W) of one shape to be compared; got "
                          f"{tuple(pred.shape)} and {tuple(target.shape)}.")
    crop = int(crop_border)
    if crop < 0 or 2 * crop >= min(pred.shape[-2:]):
        raise ConfigError(f"crop_border={crop_border} must be >= 0 and leave pixels of a "
                          f"{pred.shape[-2]}x{pred.shape[-1]} image.")
    p, t = to_unit(pred, value_range, quantize), to_unit(target, value_range, quantize)
    if y_channel:
        p, t = rgb_to_y(p), rgb_to_y(t)
    if crop:
        p, t = p[..., crop:-crop, crop:-crop], t[..., crop:-crop, crop:-crop]
    return p, t


def psnr(pred: Tensor, target: Tensor, *, y_channel: bool = False, crop_border: int = 0, quantize: bool = True,
         value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-image PSNR in dB, (N,) float64."""
    p, t = prepare(pred, target, y_channel=y_channel, crop_border=crop_border, quantize=quantize,
                   value_range=value_range)
    mse = (p - t).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def ssim(pred: Tensor, target: Tensor, *, y_channel: bool = False, crop_border: int = 0, quantize: bool = True,
         value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5, valid windows only), (N,) float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t = prepare(pred, target, y_channel=y_channel, crop_border=crop_border, quantize=quantize,
                   value_range=value_range)
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ConfigError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (its Gaussian window) after "
                          f"crop_border={crop_border}; these are {p.shape[-2]}x{p.shape[-1]}. Report PSNR alone for "
                          "such small images, or lower crop_border.")
    _, full = structural_similarity_index_measure(
        p, t, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW, data_range=1.0, k1=SSIM_K1,
        k2=SSIM_K2, reduction="none", return_full_image=True)
    radius = SSIM_WINDOW // 2
    return full[..., radius:-radius, radius:-radius].flatten(1).mean(1)


def downscale_consistency(output: Tensor, low_res_input: Tensor, factor: int, method: str = "area",
                          value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-image MSE on [0, 1] values between ``downscale(output)`` and the input, (N,) float64."""
    factor = check_factor(factor, "factor")
    n, c, h, w = output.shape
    check_divisible(h, w, factor, "factor")
    if tuple(low_res_input.shape) != (n, c, h // factor, w // factor):
        raise ConfigError(f"downscale consistency compares {n}x{c}x{h}x{w} outputs downscaled by {factor} with their "
                          f"inputs, which must then be {n}x{c}x{h // factor}x{w // factor}; got "
                          f"{'x'.join(map(str, low_res_input.shape))}.")
    low, high = value_range
    down = downscale_images(output.detach().double(), factor, method)
    diff = (down - low_res_input.detach().double()) / (high - low)
    return diff.pow(2).flatten(1).mean(1)


def image_quality(pred: Tensor, target: Tensor, *, crop_border: int = 0, quantize: bool = True,
                  value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, Tensor]:
    """PSNR and SSIM on RGB (or gray) and on Y, per image; SSIM left out for images under 11x11 after the crop."""
    kwargs = {"crop_border": crop_border, "quantize": quantize, "value_range": value_range}
    values = {"psnr": psnr(pred, target, **kwargs), "psnr_y": psnr(pred, target, y_channel=True, **kwargs)}
    if min(pred.shape[-2:]) - 2 * int(crop_border) >= SSIM_WINDOW:
        values["ssim"] = ssim(pred, target, **kwargs)
        values["ssim_y"] = ssim(pred, target, y_channel=True, **kwargs)
    return values
