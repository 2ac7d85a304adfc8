"""Loss weighting over timesteps for the DDPM process: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion
Training via Min-SNR Weighting Strategy").

Derivation. With x_t = a x_0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), a^2 + s^2 = 1) and
SNR_t = a^2 / s^2, each prediction determines an x_0 estimate given x_t, and its error is a fixed multiple of the
x_0 error:

- eps:  x0_hat = (x_t - s eps_hat) / a, so  x0_hat - x_0 = -(s / a) (eps_hat - eps),
        ||x0_hat - x_0||^2 = ||eps_hat - eps||^2 / SNR;
- v = a eps - s x_0 (Salimans & Ho 2022):  x0_hat = a x_t - s v_hat, so  x0_hat - x_0 = -s (v_hat - v),
        ||x0_hat - x_0||^2 = s^2 ||v_hat - v||^2 = ||v_hat - v||^2 / (SNR + 1)   (s^2 = 1 / (1 + SNR));
- x0:   the error itself.

Min-SNR-gamma weights the x_0-space loss by min(SNR_t, gamma) (eq. 8 of the paper: the SNR weighting that makes
eps-prediction's plain MSE, clipped at gamma so that the easy low-noise steps do not dominate). Written in the
target actually regressed, the weight on ||out - target||^2 is therefore

    eps: min(SNR, gamma) / SNR      v: min(SNR, gamma) / (SNR + 1)      x0: min(SNR, gamma)

(the v weight is the one peers get wrong by reusing the eps formula: diffusers #5654, #9451). gamma = 5 is the
paper's default. The weighted loss of each parametrisation is the same function of x0_hat (tested in
tests/unit/test_loss_weighting.py), so switching the prediction does not change what is optimised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gencli.diffusion.schedule import PREDICTIONS, ConfigError, NoiseSchedule

KINDS = ("none", "min_snr")
#: Hang et al.'s default
MIN_SNR_GAMMA = 5.0


def snr(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> Tensor:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) at timesteps ``t`` (integer, or fractional as the solvers use), shape
    (N,), in ``like``'s dtype and device."""
    alpha_bar = schedule.alpha_bar_at(t, like).flatten()
    return alpha_bar / (1 - alpha_bar)


def x0_error_factor(snr_t: Tensor, prediction: str) -> Tensor:
    """||x0_hat - x_0||^2 / ||out - target||^2 for the target ``prediction``: 1 / SNR (eps), 1 / (SNR + 1) (v), 1 (x0)."""
    if prediction == "eps":
        return 1 / snr_t
    if prediction == "v":
        return 1 / (snr_t + 1)
    if prediction == "x0":
        return torch.ones_like(snr_t)
    raise ConfigError(f"model.prediction={prediction!r} is not known; use one of {', '.join(PREDICTIONS)}.")


def min_snr_weight(snr_t: Tensor, prediction: str, gamma: float = MIN_SNR_GAMMA) -> Tensor:
    """Min-SNR-gamma's weight on ||out - target||^2: min(SNR, gamma) times :func:`x0_error_factor`."""
    return snr_t.clamp(max=gamma) * x0_error_factor(snr_t, prediction)


class LossWeighting:
    """``model.loss_weighting``: ``none`` (DDPM's simple loss) or ``min_snr`` with ``gamma``; called with the schedule,
    the prediction and the batch's timesteps, it returns one weight per sample (N,) for the per-sample MSE."""

    def __init__(self, kind: str = "none", gamma: float = MIN_SNR_GAMMA):
        if kind not in KINDS:
            raise ConfigError(f"model.loss_weighting={kind!r} is not known; use none (DDPM's unweighted loss) or "
                              "min_snr (Hang et al. 2023, with model.gamma, default 5).")
        try:
            g = float(gamma)
        except (TypeError, ValueError):
            g = float("nan")
        if kind == "min_snr" and not (g > 0 and math.isfinite(g)):
            raise ConfigError(f"model.gamma={gamma!r} must be a finite number > 0: the SNR at which min_snr clips the "
                              "x0-space weight (Hang et al. use 5).")
        self.kind, self.gamma = kind, g

    def __call__(self, schedule: NoiseSchedule, prediction: str, t: Tensor, like: Tensor) -> Tensor:
        if self.kind == "none":
            x0_error_factor(torch.ones(1), prediction)  # the same check of the prediction either way
            return torch.ones(len(t), dtype=like.dtype, device=like.device)
        return min_snr_weight(snr(schedule, t, like), prediction, self.gamma)

    def describe(self) -> dict:
        if self.kind == "none":
            return {"kind": "none"}
        return {"kind": "min_snr", "gamma": self.gamma,
                "weight": "min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), x1 (x0)"}
