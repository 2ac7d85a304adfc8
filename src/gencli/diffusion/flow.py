"""Flow matching on the straight path (Lipman et al. 2023; rectified flow, Liu et al. 2023; TorchCFM's CFM/OT-CFM).

Convention (Lipman et al., rectified flow, TorchCFM): time runs from noise to data,

    x_t = (1 - t) z + t x,     z ~ N(0, I) noise at t = 0,  x data at t = 1,

and the network predicts the velocity u_t = d x_t / dt = x - z (:class:`FlowMatchingLoss`: mean squared error to it,
t ~ U[0, 1] or logit-normal as in Esser et al. 2024). Note the direction is the reverse of DDPM's t (there t = T is
noise). A sample integrates dx/dt = v(x, t) from t = 0 (noise) to 1 (:class:`FlowSampler`: Euler, midpoint or Heun
on ``steps`` equal steps); a variation of strength s (SDEdit) starts at the grid time t_0 ~ 1 - s from
(1 - t_0) z + t_0 x_input. Guidance mixes velocities like any prediction: v_u + w (v_c - v_u).

``coupling="ot"`` pairs noise and data within the batch by exact minimal total squared distance (Tong et al.
2024's OT-CFM with an exact assignment: for two equal-size uniform batches the optimal plan is a permutation,
found by ``scipy.optimize.linear_sum_assignment``); the noise is permuted, so labels stay with their images.

gencli's nets take (x, t, labels?) with t on the DDPM scale 0..999: :class:`FlowVelocity` feeds them
``time_scale`` * t (1000 by default, as Stable Diffusion 3 does for its flow-matching nets).

Tested against the closed form for Gaussian data N(mu, s^2 I), whose exact velocity field is
v(x, t) = mu + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) (x - t mu) (tests/unit/test_flow_matching.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gencli.diffusion.samplers import randn
from gencli.diffusion.schedule import ConfigError

COUPLINGS = ("independent", "ot")
TIME_SAMPLINGS = ("uniform", "logit_normal")
METHODS = ("euler", "midpoint", "heun")
#: network evaluations per step
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}

#: ``velocity(x, t) -> v``, t a (N,) tensor in [0, 1] in x's dtype (labels and guidance bound in by the family).
Velocity = Callable[[Tensor, Tensor], Tensor]
#: ``after_step(x, t_next) -> x``, called after every step.
FlowAfterStep = Callable[[Tensor, float], Tensor]
StepCallback = Callable[[dict[str, Any]], None]


class FlowVelocity(nn.Module):
    """v(x, t, labels?) = net(x, time_scale * t, labels?): a gencli net (built for DDPM's 0..999 timesteps) as a
    velocity field of t in [0, 1]. The wrapped net is the ``net`` attribute."""

    def __init__(self, net: nn.Module, time_scale: float = 1000.0):
        super().__init__()
        self.net = net
        scale = float(time_scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"model.time_scale={time_scale!r} must be a number > 0: what t in [0, 1] is multiplied "
                              "by before the net's timestep embedding (1000 matches DDPM's 0..999 timesteps).")
        self.time_scale = scale
        self.num_classes = getattr(net, "num_classes", 0)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = (t.expand(len(x)) if t.ndim == 0 else t.flatten()) * self.time_scale
        return self.net(x, t) if labels is None else self.net(x, t, labels)


def ot_pairing(noise: Tensor, data: Tensor) -> Tensor:
    """The permutation ``perm`` minimising sum_i ||data_i - noise_perm[i]||^2 (exact, Hungarian algorithm via
    scipy); ``noise[perm]`` is then paired with ``data`` row by row."""
    from scipy.optimize import linear_sum_assignment  # scipy comes with scikit-learn, a core dependency

    if len(noise) != len(data):
        raise ValueError(f"OT pairing needs as many noise rows as data rows ({len(noise)} vs {len(data)})")
    cost = torch.cdist(data.detach().flatten(1).double().cpu(), noise.detach().flatten(1).double().cpu()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    assert np.array_equal(rows, np.arange(len(data)))
    return torch.as_tensor(cols, device=noise.device, dtype=torch.long)


def _draw(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


class FlowMatchingLoss:
    """Conditional flow matching on x_t = (1 - t) z + t x with target x - z; per-sample mean squared error."""

    def __init__(self, coupling: str = "independent", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if coupling not in COUPLINGS:
            raise ConfigError(f"model.coupling={coupling!r} is not known; use independent (plain flow matching) or ot "
                              "(minibatch optimal transport pairing of noise and data, OT-CFM).")
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"model.time_sampling={time_sampling!r} is not known; use uniform (Lipman et al.) or "
                              "logit_normal (Esser et al. 2024).")
        if not float(logit_std) > 0:
            raise ConfigError(f"model.logit_std={logit_std} must be > 0 (Esser et al. use 1).")
        self.coupling, self.time_sampling = coupling, time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def sample_times(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.time_sampling == "uniform":
            device = generator.device if generator is not None else like.device
            return torch.rand((n,), generator=generator, device=device).to(device=like.device, dtype=like.dtype)
        return torch.sigmoid(_draw((n,), like, generator) * self.logit_std + self.logit_mean)

    @staticmethod
    def path(noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
        tt = t.reshape(-1, *([1] * (data.ndim - 1)))
        return (1 - tt) * noise + tt * data

    def __call__(self, velocity: Callable[..., Tensor], data: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None, t: Tensor | None = None,
                 noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(per-sample loss (N,), t (N,)); ``velocity(x, t, labels?)``. ``t``/``noise`` may be given, else drawn (t
        first) from ``generator``; with ``coupling="ot"`` the noise is re-paired with the data either way."""
        if t is None:
            t = self.sample_times(len(data), data, generator)
        if noise is None:
            noise = _draw(tuple(data.shape), data, generator)
        if self.coupling == "ot":
            noise = noise[ot_pairing(noise, data)]
        x_t = self.path(noise, data, t)
        target = data - noise
        v = velocity(x_t, t) if labels is None else velocity(x_t, t, labels)
        return (v - target).pow(2).flatten(1).mean(1), t

    def describe(self) -> dict:
        out = {"path": "x_t = (1 - t) z + t x (t = 0 noise, 1 data)", "target": "x - z", "coupling": self.coupling,
               "time_sampling": self.time_sampling}
        if self.time_sampling == "logit_normal":
            out.update(logit_mean=self.logit_mean, logit_std=self.logit_std)
        return out


class FlowSampler:
    """Integrates dx/dt = v(x, t) from t = 0 (noise) to 1 (data) on ``steps`` equal steps.

    - ``euler``: x += h v(x, t) (1 evaluation per step, first order);
    - ``midpoint``: x += h v(x + h/2 v(x, t), t + h/2) (2 per step, second order);
    - ``heun``: x += h/2 (v(x, t) + v(x + h v(x, t), t + h)) (2 per step, second order).
    """

    name = "flow"
    deterministic = True
    markov = False

    def __init__(self, method: str = "euler", steps: int = 20):
        if method not in METHODS:
            raise ConfigError(f"sampler.method={method!r} is not known; use one of {', '.join(METHODS)}.")
        if int(steps) != steps or int(steps) < 1:
            raise ConfigError(f"sampler.steps={steps} must be a positive integer.")
        self.method, self.steps = method, int(steps)
        self.last_nfe = 0

    def times(self) -> list[float]:
        """The grid t_0 = 0 < t_1 < ... < t_steps = 1 (Python floats)."""
        return [i / self.steps for i in range(self.steps + 1)]

    def nfe(self, start: int = 0) -> int:
        return EVALS_PER_STEP[self.method] * (self.steps - start)

    def start_for(self, strength: float) -> int:
        """The step a variation of strength s starts from: the last round(s * steps) steps are walked (at least one),
        as for the diffusion samplers; it starts at t = times()[start] ~ 1 - s."""
        return self.steps - max(1, min(self.steps, round(float(strength) * self.steps)))

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "steps": self.steps}

    def __repr__(self) -> str:
        return f"FlowSampler(method={self.method}, steps={self.steps})"

    @torch.no_grad()
    def sample(self, velocity: Velocity, noise: Tensor, after_step: FlowAfterStep | None = None,
               callback: StepCallback | None = None) -> Tensor:
        """Noise (x at t = 0) -> data (x at t = 1)."""
        return self.run(velocity, noise, 0, after_step, callback)

    @torch.no_grad()
    def vary(self, velocity: Velocity, data: Tensor, strength: float, generator: Any = None,
             callback: StepCallback | None = None) -> Tensor:
        """SDEdit: start at t_0 = times()[start_for(strength)] from (1 - t_0) z + t_0 data and integrate to 1."""
        if not 0.0 < float(strength) <= 1.0:
            raise ConfigError(f"strength={strength} must be in (0, 1]: how far toward noise the input is pushed before "
                              "the flow brings it back (SDEdit; 0.3 keeps the layout, 1 ignores the input).")
        start = self.start_for(strength)
        t0 = self.times()[start]
        x = (1 - t0) * randn(tuple(data.shape), data, generator) + t0 * data
        return self.run(velocity, x, start, None, callback)

    @torch.no_grad()
    def run(self, velocity: Velocity, x: Tensor, start: int = 0, after_step: FlowAfterStep | None = None,
            callback: StepCallback | None = None) -> Tensor:
        """Integrate from ``times()[start]`` (``x`` is x there) to t = 1."""
        ts = self.times()
        self.last_nfe = 0

        def v(x: Tensor, t: float) -> Tensor:
            self.last_nfe += 1
            return velocity(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device))

        for i in range(start, self.steps):
            t, t_next = ts[i], ts[i + 1]
            h = t_next - t
            if self.method == "euler":
                x = x + h * v(x, t)
            elif self.method == "midpoint":
                x = x + h * v(x + 0.5 * h * v(x, t), t + 0.5 * h)
            else:
                d = v(x, t)
                x = x + 0.5 * h * (d + v(x + h * d, t_next))
            if after_step is not None:
                x = after_step(x, t_next)
            if callback is not None:
                callback({"i": i, "steps": self.steps, "t": t, "t_next": t_next, "x": x, "nfe": self.last_nfe})
        return x


class KnownRegionFlow:
    """Replacement inpainting on the flow path: after each step to t, the known region is replaced by
    (1 - t) z + t known (fresh z each time; ``known`` itself at t = 1). ``mask`` is 1 where x is known."""

    def __init__(self, known: Tensor, mask: Tensor, generator: Any = None):
        self.known, self.mask, self.generator = known, mask, generator

    def paste(self, x: Tensor, t: float) -> Tensor:
        noised = self.known if t >= 1 else (1 - t) * randn(tuple(x.shape), x, self.generator) + t * self.known
        return self.mask * noised + (1 - self.mask) * x
