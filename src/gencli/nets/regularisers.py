"""GAN regularisers of StyleGAN2 (Karras et al. 2020), usable beside the existing penalties of families/gan.py.

- R1 (Mescheder et al. 2018): gamma/2 * E_x~data ||grad_x D(x)||^2, on real images only.
- Lazy regularisation (StyleGAN2 section 3.1): the regulariser runs every ``interval`` minibatches, not every
  one, and its loss is multiplied by ``interval`` so that on average it keeps its strength; the optimiser of that
  net then sees interval+1 updates per interval, so its learning rate and Adam betas are adjusted by
  c = interval/(interval+1): lr*c, beta**c (:func:`lazy_adam_hparams`).
- Path-length regularisation (StyleGAN2 section 3.2): for y ~ N(0, I)/sqrt(H W), the Jacobian-vector norm
  ||J_w^T y|| = ||grad_w <G(w), y>|| should be constant; penalty E (||J^T y|| - a)^2 with ``a`` the running mean
  of the norms (decay 0.01), weight 2 in the paper, on a smaller batch (pl_batch_shrink 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gencli.errors import ConfigError


def r1_grad_norms(scores: Tensor, reals: Tensor) -> Tensor:
    """Per-sample ||grad_x D(x)||^2, shape (N,). ``reals`` must require grad and ``scores`` = D(reals) (N,).
    The graph is kept (create_graph) so the penalty can be backpropagated into D."""
    if not reals.requires_grad:
        raise ValueError("r1_grad_norms needs reals.requires_grad_(True) before D(reals)")
    (grad,) = torch.autograd.grad(scores.sum(), reals, create_graph=True)
    return grad.square().flatten(1).sum(1)


def r1_penalty(scores: Tensor, reals: Tensor, gamma: float) -> Tensor:
    """gamma/2 * mean_n ||grad_x D(x_n)||^2 (a scalar)."""
    return r1_grad_norms(scores, reals).mean() * (gamma / 2)


class LazyRegulariser:
    """When a lazy regulariser runs and by how much its loss is scaled.

    ``due(step)``: True every ``interval`` steps (steps 0, interval, 2*interval, ...); interval 1 = every step,
    interval 0 = never (off). ``scale`` = interval, the factor on the regulariser's loss when it runs."""

    def __init__(self, interval: int):
        if int(interval) != interval or interval < 0:
            raise ConfigError(f"regularisation interval {interval} must be a whole number >= 0 "
                              "(16 for R1 and 4 for path length in StyleGAN2; 1 every step; 0 off).")
        self.interval = int(interval)

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    @property
    def scale(self) -> int:
        return self.interval

    def scaled(self, loss: Tensor) -> Tensor:
        return loss * self.scale


def lazy_adam_hparams(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """StyleGAN2's optimiser adjustment for a net with a lazy regulariser: c = interval/(interval+1),
    lr -> lr*c, (b1, b2) -> (b1**c, b2**c). interval 0 (no regulariser) or 1 (every step, no separate pass) leaves
    them unchanged."""
    if interval <= 1:
        return lr, betas
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


class PathLengthPenalty(nn.Module):
    """Path-length regulariser with its running mean ``pl_mean`` (a buffer, so it is checkpointed).

    ``forward(images, ws)``: images = synthesis(ws), ws requiring grad (N, num_ws, w_dim). Returns the penalty
    mean_n (||J_n^T y_n|| - a)^2 times ``weight`` and updates a <- a + decay * (mean ||J^T y|| - a)
    (in training mode). ||J^T y|| is sqrt(mean over the ws layers of the squared norm over w_dim), as in the
    reference implementation. ``noise`` may be passed for a deterministic check."""

    def __init__(self, weight: float = 2.0, decay: float = 0.01):
        super().__init__()
        if weight < 0 or not 0 < decay <= 1:
            raise ConfigError(f"pl_weight={weight} must be >= 0 and pl_decay={decay} in (0, 1].")
        self.weight, self.decay = float(weight), float(decay)
        self.register_buffer("pl_mean", torch.zeros(()))

    def lengths(self, images: Tensor, ws: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
        return grad.square().sum(2).mean(1).sqrt()

    def forward(self, images: Tensor, ws: Tensor, noise: Tensor | None = None) -> Tensor:
        lengths = self.lengths(images, ws, noise)
        if self.training:
            with torch.no_grad():
                self.pl_mean.copy_(self.pl_mean.lerp(lengths.detach().float().mean(), self.decay))
        return (lengths - self.pl_mean.to(lengths.dtype)).square().mean() * self.weight
