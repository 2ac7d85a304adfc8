"""The GAN losses: the gradient penalty against hand-computed cases and each loss's sign conventions."""

from __future__ import annotations

import math

import pytest
import torch

from gencli.errors import ConfigError
from gencli.families.gan import (
    LOSSES,
    confident_fraction,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    pairwise_accuracy,
)


class Linear(torch.nn.Module):
    """D(x) = <w, x>: its gradient in x is w everywhere, so GP = (||w|| - 1)^2."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1)


def test_gradient_penalty_linear_critic_hand_computed():
    w = torch.tensor([[[[1.0, 2.0], [2.0, 0.0]]]])  # ||w|| = 3
    critic = Linear(w)
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((3.0 - 1.0) ** 2)
    # create_graph: the penalty's gradient reaches the critic's weights: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    gp.backward()
    torch.testing.assert_close(critic.w.grad, 2 * (3.0 - 1.0) * w / 3.0)


def test_gradient_penalty_quadratic_critic_at_given_interpolates():
    # D(x) = 0.5 ||x||^2 has gradient x, so at x_hat = eps*real + (1-eps)*fake the penalty is (||x_hat|| - 1)^2.
    real = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[0.0, 0.0], [0.0, -2.0]]).view(2, 1, 1, 2)
    eps = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    # image 0: x_hat = (1.5, 2.0), norm 2.5 -> 2.25;  image 1: x_hat = (0, -1), norm 1 -> 0
    gp = gradient_penalty(lambda x: 0.5 * x.flatten(1).pow(2).sum(1), real, fake, eps=eps)
    assert gp.item() == pytest.approx((2.25 + 0.0) / 2)


def test_gradient_penalty_is_zero_for_a_unit_lipschitz_critic():
    w = torch.zeros(1, 1, 2, 2)
    w[0, 0, 0, 1] = 1.0
    assert gradient_penalty(Linear(w), torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)).item() == pytest.approx(0.0)


def test_bce_values_and_non_saturating_generator():
    zero = torch.zeros(4)
    assert discriminator_loss("bce", zero, zero).item() == pytest.approx(2 * math.log(2))
    assert generator_loss("bce", zero).item() == pytest.approx(math.log(2))
    # Non-saturating: when D confidently rejects the fakes, G's gradient is still about -1 per unit score
    # (the minimax log(1 - D) would give almost nothing).
    d_fake = torch.full((4,), -10.0, requires_grad=True)
    generator_loss("bce", d_fake).backward()
    assert d_fake.grad.mean().item() == pytest.approx(-1 / 4, rel=1e-3)


def test_wgan_and_hinge_values():
    d_real, d_fake = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 0.0])
    assert discriminator_loss("wgan_gp", d_real, d_fake).item() == pytest.approx(-0.5 - 3.0)
    assert generator_loss("wgan_gp", d_fake).item() == pytest.approx(0.5)
    # hinge: zero once reals score >= 1 and fakes <= -1; 2 when D outputs 0 everywhere
    assert discriminator_loss("hinge", torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -3.0])).item() == 0.0
    assert discriminator_loss("hinge", torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2.0)
    assert discriminator_loss("hinge", torch.tensor([0.5]), torch.tensor([0.0])).item() == pytest.approx(0.5 + 1.0)
    assert generator_loss("hinge", d_fake).item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss", LOSSES)
def test_sign_conventions(loss):
    """Every loss: D is rewarded for scoring reals high and fakes low; G for making D score fakes high."""
    high, low = torch.full((8,), 3.0), torch.full((8,), -3.0)
    assert discriminator_loss(loss, high, low) < discriminator_loss(loss, low, high)
    assert generator_loss(loss, high) < generator_loss(loss, low)

    d_real = torch.linspace(-0.5, 0.5, 8).requires_grad_(True)
    d_fake = torch.linspace(-0.5, 0.5, 8).requires_grad_(True)
    discriminator_loss(loss, d_real, d_fake).backward()
    assert (d_real.grad < 0).all() and (d_fake.grad > 0).all()  # descent raises real scores, lowers fake ones
    g_fake = torch.linspace(-0.5, 0.5, 8).requires_grad_(True)
    generator_loss(loss, g_fake).backward()
    assert (g_fake.grad < 0).all()  # descent raises the scores of the fakes


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="model.loss='lsgan'"):
        discriminator_loss("lsgan", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ConfigError, match="model.loss='lsgan'"):
        generator_loss("lsgan", torch.zeros(1))


def test_discriminator_diagnostics():
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    assert pairwise_accuracy(d_real, d_fake).item() == pytest.approx(3 / 4)  # only (1.0, 2.0) is misordered
    sure = torch.tensor([5.0, 5.0]), torch.tensor([-5.0, -5.0])
    assert confident_fraction("bce", *sure).item() == 1.0
    assert confident_fraction("bce", torch.tensor([4.0, 5.0]), torch.tensor([-5.0, 0.0])).item() == 0.5
    assert confident_fraction("hinge", torch.tensor([1.0, 0.9]), torch.tensor([-1.0, -2.0])).item() == 0.75
    assert confident_fraction("wgan_gp", *sure) is None
