"""R1, lazy regularisation and path-length penalty (issue 28)."""

import math

import pytest
import torch

from gencli.errors import ConfigError
from gencli.nets.regularisers import (
    LazyRegulariser,
    PathLengthPenalty,
    lazy_adam_hparams,
    r1_grad_norms,
    r1_penalty,
)


def test_r1_matches_analytic_gradient_of_toy_discriminator():
    # D(x) = sum_i a_i x_i^2 + <b, x>: grad = 2 a x + b, analytically
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    x = torch.randn(5, 2, 3, 3, requires_grad=True)
    scores = (a * x.square() + b * x).flatten(1).sum(1)
    norms = r1_grad_norms(scores, x)
    analytic = (2 * a * x.detach() + b).square().flatten(1).sum(1)
    torch.testing.assert_close(norms, analytic)
    gamma = 10.0
    x2 = x.detach().clone().requires_grad_(True)
    pen = r1_penalty((a * x2.square() + b * x2).flatten(1).sum(1), x2, gamma)
    torch.testing.assert_close(pen, analytic.mean() * gamma / 2)


def test_r1_backpropagates_into_discriminator_parameters():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    x = torch.randn(6, 4, requires_grad=True)
    # D(x) = w.x + c: ||grad||^2 = ||w||^2 for every x, so d(pen)/dw = gamma/2 * 2 w = gamma * w
    pen = r1_penalty(lin(x).flatten(), x, gamma=3.0)
    pen.backward()
    torch.testing.assert_close(lin.weight.grad, 3.0 * lin.weight.detach())
    assert lin.bias.grad is None or torch.all(lin.bias.grad == 0)
    with pytest.raises(ValueError):
        r1_grad_norms(lin(x.detach()).flatten(), x.detach())


def test_lazy_regularisation_schedule_and_scaling():
    lazy = LazyRegulariser(16)
    assert [s for s in range(50) if lazy.due(s)] == [0, 16, 32, 48]
    assert lazy.scale == 16
    loss = torch.tensor(0.25)
    torch.testing.assert_close(lazy.scaled(loss), torch.tensor(4.0))
    # over one interval the lazily applied, scaled penalty adds up to the penalty applied every step
    total = sum(float(lazy.scaled(loss)) for s in range(16) if lazy.due(s))
    assert total == pytest.approx(16 * 0.25)
    assert [s for s in range(5) if LazyRegulariser(1).due(s)] == [0, 1, 2, 3, 4]
    assert not any(LazyRegulariser(0).due(s) for s in range(5))
    with pytest.raises(ConfigError):
        LazyRegulariser(-1)
    lr, betas = lazy_adam_hparams(0.0025, (0.0, 0.99), 16)
    c = 16 / 17
    assert lr == pytest.approx(0.0025 * c) and betas == pytest.approx((0.0, 0.99 ** c))
    assert lazy_adam_hparams(0.002, (0.5, 0.9), 1) == (0.002, (0.5, 0.9))


def test_path_length_penalty_on_linear_synthesis():
    # images = ws[:, 0] @ M reshaped: J^T y = M y for layer 0 and 0 for the other layers
    torch.manual_seed(0)
    n, num_ws, w_dim = 3, 2, 4
    M = torch.randn(w_dim, 1 * 2 * 2, requires_grad=True)  # the generator's parameter
    ws = torch.randn(n, num_ws, w_dim, requires_grad=True)
    images = (ws[:, 0] @ M).view(n, 1, 2, 2)
    noise = torch.randn(n, 1, 2, 2)
    pl = PathLengthPenalty(weight=2.0, decay=0.5)
    expected_len = ((noise.flatten(1) @ M.detach().t()).square().sum(1) / num_ws).sqrt()
    torch.testing.assert_close(pl.lengths(images, ws, noise), expected_len)
    pen = pl(images, ws, noise)
    a = 0.5 * expected_len.mean()  # lerp from 0 with decay 0.5
    torch.testing.assert_close(pl.pl_mean, a)
    torch.testing.assert_close(pen, ((expected_len - a) ** 2).mean() * 2.0)
    pen.backward()  # into the generator's parameters (J does not depend on ws for a linear synthesis)
    assert M.grad is not None and torch.isfinite(M.grad).all() and M.grad.abs().sum() > 0
    assert "pl_mean" in pl.state_dict()
    pl.eval()
    before = pl.pl_mean.clone()
    pl(images, ws, noise)
    torch.testing.assert_close(pl.pl_mean, before)
    # the default noise is scaled by 1/sqrt(H W)
    assert math.isfinite(float(PathLengthPenalty()(images, ws).detach()))
